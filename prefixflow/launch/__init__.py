"""How a training runs: the launch command, gang supervision, the job every rank runs, Slurm, the
per-machine entry point, Kubernetes rendering, GPU slots and the checkpoint mirror."""
