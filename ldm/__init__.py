"""Asymmetric decoders for latent-diffusion autoencoders (the SD KL-f8 family, Qwen-Image).

The package by concern, low layer to high (a module imports its own layer or lower ones; tests/test_layout.py):
files.py, latent_norm.py, metrics.py (shared by every concern) < modules/ (networks; a folder per family) <
formats/ (checkpoints in and out) < models/ (the training recipe) < training/ (a run) < decoding/ (pipelines) <
evaluation/ < cli.py (the scripts' argument types) < this file, the package's face.
"""
from .formats.convert import CheckpointError, LoadReport, load_autoencoder, load_into
from .modules.families import FAMILIES, PRESETS, build_autoencoder
from .modules.families import AsymmetricAutoencoderKL  # noqa: F401  (the SD family's class, for `from ldm import`)

__all__ = ["AsymmetricAutoencoderKL", "FAMILIES", "PRESETS", "build_autoencoder", "CheckpointError", "LoadReport",
           "load_autoencoder", "load_into"]
