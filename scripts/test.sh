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
# 8 virtual CPU devices for the sharding tests; tests that need 1 run in subprocesses.
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --durations=25 "$@"
