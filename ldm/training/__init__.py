"""The training run: `config.py` (strict merging) and `checks.py` (what each value must be), `run.py` (building a
run: checked inputs -> networks -> system -> datamodule -> trainer, what train.py reads straight down into),
`callbacks.py`, `checkpointing.py` (atomic, resumable), `runlock.py` (one job a run folder), `cluster.py` (DDP,
SLURM), `summary.py`. Imports ldm/models/, ldm/formats/, ldm/modules/ (the registry), data/ and the shared top."""
