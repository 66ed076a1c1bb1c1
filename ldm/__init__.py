"""Asymmetric decoder for Stable Diffusion's KL-f8 autoencoder."""
from .convert import CheckpointError, LoadReport, load_autoencoder, load_into
from .modules.autoencoder import PRESETS, AsymmetricAutoencoderKL

__all__ = ["AsymmetricAutoencoderKL", "PRESETS", "CheckpointError", "LoadReport", "load_autoencoder", "load_into"]
