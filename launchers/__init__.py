"""Launchers: Ray job submission and SLURM batch scripts for the iak-dist pipeline."""
