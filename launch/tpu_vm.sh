#!/usr/bin/env bash
# Runs pemn_jax.main on every worker of a Cloud TPU VM slice (gcloud; for
# TPU generations that GKE serves, e.g. TPU7x, use launch/xpk.sh): every
# worker runs the same command, JAX finds the slice (--distributed).
# Code, data and workdir live in a Cloud Storage bucket mounted with gcsfuse
# at the same path on every worker.
#
#   bash launch/tpu_vm.sh [--dry-run] ARGS...     ARGS: pemn_jax.main flags
#   TPU_NAME=my-v5p ZONE=us-east5-a BUCKET=my-bucket bash launch/tpu_vm.sh \
#     --config configs/pemn.py:model=resnet18,dataset=cifar10 --workdir /gcs/my-bucket/runs/pemn
#
# --dry-run prints the gcloud commands instead of running them.
# Variables (environment):
#   TPU_NAME (required), ZONE (required), PROJECT=  the slice
#   BUCKET (required)     mounted at MOUNT on every worker with gcsfuse
#   MOUNT=/gcs/$BUCKET
#   CODE=$MOUNT/pemn_jax  a checkout of this repository in the bucket (copied
#                         to each worker's disk before the run)
#   DATA_DIR=$MOUNT/tensorflow_datasets   prepared TFDS data (config.data_dir)
#   SETUP=1               pip install the checkout on every worker first
# Put --workdir under $MOUNT so that every worker (and a later resume) sees it.
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
[[ $# -gt 0 ]] || { echo "usage: launch/tpu_vm.sh [--dry-run] --config ... --workdir ..." >&2; exit 2; }
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET}"
MOUNT=${MOUNT:-/gcs/$BUCKET}
CODE=${CODE:-$MOUNT/pemn_jax}
DATA_DIR=${DATA_DIR:-$MOUNT/tensorflow_datasets}
SETUP=${SETUP:-1}
quoted=$(printf ' %q' "$@")
# Each worker copies the code to its own disk (installing in the shared
# checkout from all workers at once would race on its build files).
remote="set -e; sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT; mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT; rm -rf /tmp/pemn_jax_code && cp -r $CODE /tmp/pemn_jax_code && cd /tmp/pemn_jax_code"
if [[ $SETUP == 1 ]]; then remote="$remote; python3 -m pip install -q -e '.[tpu]'"; fi
# After the user's flags (absl reads --config.* only after --config), and
# only where they do not set config.data_dir themselves.
data_dir_flag() {
  case " $* " in *" --config.data_dir"*) ;; *) printf ' --config.data_dir=%q' "$DATA_DIR" ;; esac
}
remote="$remote; python3 -m pemn_jax.main --distributed$quoted$(data_dir_flag "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"}
     --worker=all --command "$remote")
if [[ $DRY == 1 ]]; then
  echo "# on every worker of $TPU_NAME: $remote"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
"${cmd[@]}"
