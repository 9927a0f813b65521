#!/usr/bin/env bash
# The main job on a fresh machine: Fashion-MNIST (Debian package) + venv +
# install + the quickstart config (PEMN RP + masks on an MLP). Extra arguments
# go to pemn_jax.main (e.g. --config.num_epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y dataset-fashion-mnist || { $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python -m pemn_jax.main --config configs/quickstart.py \
  --workdir "${WORKDIR:-workdirs/quickstart}" "$@"
