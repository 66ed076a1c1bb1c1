"""The Qwen-Image family (Qwen-Image, Qwen-Image-Edit; its VAE is fine-tuned from the Wan 2.1 video VAE, run here on
one frame): `autoencoder.py` its blocks, encoder, asymmetric decoder and class (`family = "qwenimage"`), `keys.py`
its key tables (Wan single-file <-> diffusers names, 3D tensors <-> one frame, widths, export form).
Imports ldm/modules/common.py and ldm/latent_norm.py only; only ldm/modules/families.py imports it."""
