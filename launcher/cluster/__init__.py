"""Running on a cluster: Slurm jobs, the per-node launcher, the rank watchdog."""
