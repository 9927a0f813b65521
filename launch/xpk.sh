#!/usr/bin/env bash
# Submits pemn_jax.main as a GKE workload on a TPU slice with xpk (the
# supported route for current TPU generations). xpk builds an image from
# BASE_IMAGE plus this checkout (--script-dir) and starts one pod per TPU
# host; JobSet sets TPU_WORKER_HOSTNAMES, which pemn_jax detects and hands to
# jax.distributed.
#
#   bash launch/xpk.sh [--dry-run] ARGS...        ARGS: pemn_jax.main flags
#   CLUSTER=my-gke TPU_TYPE=v5p-32 bash launch/xpk.sh \
#     --config configs/pemn.py:model=resnet18,dataset=cifar10 --workdir /gcs/my-bucket/runs/pemn
#
# --dry-run prints the xpk command instead of running it.
# Variables (environment):
#   CLUSTER (required)    the GKE cluster xpk created
#   TPU_TYPE=v5p-8        e.g. v5p-32, v6e-16, tpu7x-4x4x4
#   NUM_SLICES=1
#   WORKLOAD=pemn-<user>-<time>   workload name (lower case, <= 40 chars)
#   PROJECT=, ZONE=       passed to xpk when set
#   BASE_IMAGE=python:3.11    base image; the checkout is added on top
#   DATA_DIR=/gcs/data/tensorflow_datasets   config.data_dir inside the pods
# The workdir and data dir must be storage all pods see (e.g. a bucket
# attached with `xpk storage attach ... --type=gcsfuse --mount-point=/gcs/...`).
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
[[ $# -gt 0 ]] || { echo "usage: launch/xpk.sh [--dry-run] --config ... --workdir ..." >&2; exit 2; }
: "${CLUSTER:?set CLUSTER}"
TPU_TYPE=${TPU_TYPE:-v5p-8}
NUM_SLICES=${NUM_SLICES:-1}
WORKLOAD=${WORKLOAD:-pemn-$(id -un | tr -cd 'a-z0-9' | cut -c1-12)-$(date +%m%d%H%M%S)}
BASE_IMAGE=${BASE_IMAGE:-python:3.11}
DATA_DIR=${DATA_DIR:-/gcs/data/tensorflow_datasets}
REPO=$(cd "$(dirname "$0")/.." && pwd)
quoted=$(printf ' %q' "$@")
# After the user's flags (absl reads --config.* only after --config), and
# only where they do not set config.data_dir themselves.
data_dir_flag() {
  case " $* " in *" --config.data_dir"*) ;; *) printf ' --config.data_dir=%q' "$DATA_DIR" ;; esac
}
inner="pip install -q -e '.[tpu]' && python3 -m pemn_jax.main$quoted$(data_dir_flag "$@")"
cmd=(xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --tpu-type "$TPU_TYPE"
     --num-slices "$NUM_SLICES" --base-docker-image "$BASE_IMAGE" --script-dir "$REPO"
     ${PROJECT:+--project "$PROJECT"} ${ZONE:+--zone "$ZONE"} --command "$inner")
if [[ $DRY == 1 ]]; then
  echo "# in every pod of $WORKLOAD ($NUM_SLICES x $TPU_TYPE): $inner"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
command -v xpk >/dev/null || { echo "xpk not found: pip install xpk" >&2; exit 2; }
"${cmd[@]}"
