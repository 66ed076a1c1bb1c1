"""Fixtures shared by the test files."""
from slurm_cluster import slurm_cluster  # noqa: F401  (the `slurm` tier's one-node SLURM, session-scoped)
