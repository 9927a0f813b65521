#!/usr/bin/env bash
# Sets up a virtual environment (if missing), installs pemn_jax with its test
# extra, lints with ruff and runs the test suite. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real Fashion-MNIST for the documented-command tests (Debian's package, as the quickstart).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
    { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check .
# XLA's persistent compilation cache, fresh for this run and shared by the
# workers and the subprocesses they start: many tests (and documented commands)
# compile the same train step again; a hit returns the same executable.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d -t pemn_jax_xla_cache.XXXXXX)
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}
# 8 virtual CPU devices for the sharding tests; tests that need 1 run in subprocesses.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
