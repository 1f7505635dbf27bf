"""How people run Plait on clusters: ray job submit, Slurm, torchrun, mpirun."""
