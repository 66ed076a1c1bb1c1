"""Decoding with diffusers pipelines: `pipelines.py` runs an inpainting pipeline to its final latents and decodes
them with our decoder at the image's own shape (the table of pipelines; tiling itself is ldm/modules/tiling.py).
Imports ldm/formats/, ldm/modules/ (tiling), data/ and the shared top; never ldm/training/ or ldm/evaluation/."""
