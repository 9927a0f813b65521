#!/usr/bin/env bash
# Runs N processes of pemn_jax.main on this machine, as a multi-host job would
# (jax.distributed over gloo on CPU). Each process gets DEVICES CPU devices.
#   bash launch/local.sh 2 --config configs/quickstart.py --workdir /tmp/mp
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: launch/local.sh NUM_PROCESSES ARGS...}; shift
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-.venv/bin/python}
pids=()
for i in $(seq 0 $((N - 1))); do
  JAX_NUM_CPU_DEVICES=${DEVICES:-1} JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    "$PY" -m pemn_jax.main --coordinator "127.0.0.1:$PORT" --num_processes "$N" \
    --process_id "$i" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
