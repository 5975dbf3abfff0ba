"""Conversion between pretrained Mamba checkpoints and HMamba (`hmamba convert`, `hmamba export`)."""

from .checkpoints import CheckpointError, atomic_output_dir, convert, export, load_state_dict, read_mamba

__all__ = ["CheckpointError", "atomic_output_dir", "convert", "export", "load_state_dict", "read_mamba"]
