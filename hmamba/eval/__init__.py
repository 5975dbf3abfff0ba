"""Evaluation helpers. The lm-eval harness integration and `hmamba eval` / `hmamba bench` are later work."""

from .perplexity import perplexity

__all__ = ["perplexity"]
