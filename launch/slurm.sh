#!/usr/bin/env bash
# Submits a multi-node GPU training job to SLURM: sbatch runs one srun step of
# pemn_jax.main on every node; jax.distributed finds its peers from SLURM's
# variables (pemn_jax/train/multihost.py), no flags needed.
#
#   bash launch/slurm.sh [--dry-run] ARGS...      ARGS: pemn_jax.main flags
#   NODES=4 GPUS_PER_NODE=8 bash launch/slurm.sh --config configs/pemn.py:model=resnet18,dataset=cifar10 --workdir /shared/runs/pemn
#
# --dry-run prints the batch script instead of submitting it.
# Variables (environment):
#   NODES=2               nodes
#   GPUS_PER_NODE=8       GPUs per node
#   PER=node              node: one process per node owning all its GPUs
#                         (--local_device_ids=all; JAX's SLURM detection alone
#                         would give it one GPU); gpu: one process per GPU
#   PARTITION=, ACCOUNT=  passed to sbatch when set
#   TIME=24:00:00         time limit; SIGTERM comes 120 s before it and every
#                         process checkpoints and exits 0 (rerun = resume)
#   CPUS_PER_TASK=        sbatch --cpus-per-task when set
#   JOB_NAME=pemn_jax
#   PYTHON=.venv/bin/python   on storage every node sees, same path
#   REPO=<this checkout>  the code, on shared storage
# --workdir (and the data dir) must be on storage every node sees.
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
[[ $# -gt 0 ]] || { echo "usage: launch/slurm.sh [--dry-run] --config ... --workdir ..." >&2; exit 2; }
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PER=${PER:-node}
TIME=${TIME:-24:00:00}
JOB_NAME=${JOB_NAME:-pemn_jax}
PYTHON=${PYTHON:-.venv/bin/python}
case "$PER" in
  node) TASKS=1; EXTRA=(--local_device_ids=all) ;;
  gpu) TASKS=$GPUS_PER_NODE; EXTRA=() ;;
  *) echo "PER must be node or gpu, got '$PER'" >&2; exit 2 ;;
esac
quoted=$(printf ' %q' "$@" "${EXTRA[@]}")
script="#!/bin/bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --time=$TIME
#SBATCH --signal=TERM@120
#SBATCH --requeue${PARTITION:+
#SBATCH --partition=$PARTITION}${ACCOUNT:+
#SBATCH --account=$ACCOUNT}${CPUS_PER_TASK:+
#SBATCH --cpus-per-task=$CPUS_PER_TASK}
set -euo pipefail
cd $(printf '%q' "$REPO")
# --kill-on-bad-exit: a process that fails takes the step down at once.
srun --kill-on-bad-exit=1 $(printf '%q' "$PYTHON") -m pemn_jax.main$quoted"
if [[ $DRY == 1 ]]; then
  echo "# would submit with: sbatch"
  echo "$script"
  exit 0
fi
command -v sbatch >/dev/null || { echo "sbatch not found: run this on a SLURM login node" >&2; exit 2; }
echo "$script" | sbatch
