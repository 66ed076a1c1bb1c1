"""Decoding with diffusers pipelines: `table.py` says how each inpainting or editing pipeline is driven (one entry
each), `inputs.py` reads the image, mask, control image and batch files, `pipelines.py` runs a pipeline to its final
latents and decodes them with our decoder at the image's own shape (tiling itself is ldm/modules/tiling.py).
Imports ldm/formats/, ldm/modules/ (tiling), data/ and the shared top; never ldm/training/ or ldm/evaluation/."""
