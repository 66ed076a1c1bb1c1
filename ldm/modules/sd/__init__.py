"""The SD family (SD 1.x, SDXL, SD 3, FLUX.1, FLUX.2: the KL-f8 layout at 4, 16 or 32 latent channels): `vae.py` its
blocks, encoder and asymmetric decoder, `autoencoder.py` the class (`family = "sd"`), `keys.py` its key tables
(ldm <-> diffusers names, widths from weights or config.json, FLUX.2's batch-norm statistics).
Imports ldm/modules/common.py and ldm/latent_norm.py only; only ldm/modules/families.py imports it."""
