"""Evaluation: `loop.py` (decoders side by side: batched decoding, region metrics, FID, reports), `run.py` (an
evaluation built from scripts/eval.py's arguments), `generated.py` (the latents an inpainting pipeline generates,
cached), `ablation.py` (a set of runs, one evaluation, one table). The highest layer: imports ldm/decoding/,
ldm/training/ (config, checkpoints, locks), ldm/formats/, ldm/modules/, data/ and the shared top."""
