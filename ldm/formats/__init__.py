"""Checkpoint formats: `convert.py` reads every format (SD, ldm, diffusers, Wan, official, run, decoder export) into
an autoencoder (`load_autoencoder`), `export.py` writes the export forms and `card.py` the model card beside them,
`bases.py` knows which base a VAE file is (configs/bases/*.yaml) and refuses a VAE of another. Key tables live with
their family (ldm/modules/<family>/keys.py), reached through ldm/modules/families.py. Imports ldm/modules/,
ldm/latent_norm.py and ldm/files.py."""
