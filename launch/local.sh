#!/usr/bin/env bash
# Runs N processes of pemn_jax.main on this machine, as a multi-host job would
# (jax.distributed over gloo on CPU): the tests' multi-process launcher.
#
#   bash launch/local.sh [--dry-run] N ARGS...    ARGS: pemn_jax.main flags
#   bash launch/local.sh 2 --config configs/quickstart.py --workdir /tmp/mp
#
# --dry-run prints the N commands instead of running them.
# Variables (environment):
#   DEVICES=1     CPU devices per process (JAX_NUM_CPU_DEVICES)
#   PORT=random   coordinator port on 127.0.0.1
#   PYTHON=.venv/bin/python
# Exit status: the last non-zero status of a process (0 if all succeeded).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
N=${1:?usage: launch/local.sh [--dry-run] NUM_PROCESSES ARGS...}; shift
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-.venv/bin/python}
pids=()
for i in $(seq 0 $((N - 1))); do
  cmd=(env JAX_NUM_CPU_DEVICES="${DEVICES:-1}" JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
       "$PY" -m pemn_jax.main --coordinator "127.0.0.1:$PORT" --num_processes "$N"
       --process_id "$i" "$@")
  if [[ $DRY == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; continue; fi
  "${cmd[@]}" &
  pids+=($!)
done
[[ $DRY == 1 ]] && exit 0
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
