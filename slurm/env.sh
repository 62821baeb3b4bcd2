# Point Slurm's client commands (sinfo, sbatch, scontrol, sacct, ...) at the local test cluster that
# slurm/start-cluster.sh runs:  source slurm/env.sh
# On a real cluster you need none of this: the site's slurm.conf is found by default.
export HPC_SLURM_DIR=${HPC_SLURM_DIR:-/tmp/hpc-grpo-slurm}
export SLURM_CONF=$HPC_SLURM_DIR/etc/slurm.conf
