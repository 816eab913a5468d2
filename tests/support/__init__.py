"""Test-only code: tiny models, pipeline fixtures, the local Slurm cluster."""
