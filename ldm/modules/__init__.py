"""The networks, as plain nn.Modules (no Lightning): `common.py` what every autoencoder family shares (the posterior,
the masked-image branch, the AsymmetricAutoencoder interface, CheckpointError), one folder per family (`sd/`,
`qwenimage/`: blocks, encoder, decoder, key tables), `families.py` the registry that builds them from config kwargs
and reads their key layouts, `losses.py` (PatchGAN, LPIPS, adaptive weight), `tiling.py` (decode(tile=)).
Imports ldm/latent_norm.py only, of the rest of ldm; a family's folder is imported by families.py alone."""
