"""Asymmetric decoders for latent-diffusion autoencoders (the SD KL-f8 family, Qwen-Image)."""
from .convert import CheckpointError, LoadReport, load_autoencoder, load_into
from .modules.autoencoder import PRESETS, AsymmetricAutoencoderKL
from .modules.families import FAMILIES, build_autoencoder

__all__ = ["AsymmetricAutoencoderKL", "FAMILIES", "PRESETS", "build_autoencoder", "CheckpointError", "LoadReport",
           "load_autoencoder", "load_into"]
