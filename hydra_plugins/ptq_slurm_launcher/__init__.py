"""Hydra launcher plugin of ptq-launcher: `cluster=slurm` (see ptq_slurm_launcher.py)."""
