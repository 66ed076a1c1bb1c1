"""Asymmetric decoder for Stable Diffusion's KL-f8 autoencoder."""
from .modules.autoencoder import PRESETS, AsymmetricAutoencoderKL

__all__ = ["AsymmetricAutoencoderKL", "PRESETS"]
