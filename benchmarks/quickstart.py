"""The main job's claim: PEMN (quickstart) vs the same MLP trained dense with
the same budget, on Fashion-MNIST; model files in float32/float16/bfloat16
and with every float on an 8- and a 6-bit grid (``export --float_bits``),
every accuracy evaluated from the file.

    .venv/bin/python benchmarks/quickstart.py              # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/quickstart.py --smoke      # a few steps (checks the script)

Last lines, one per model file:
    <method>/<codec> file_bytes=<n> size_ratio_to_dense_file=<x> accuracy=<y>
(codec: f32, f16, bf16, grid8, grid6)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # benchmarks/ and the repo root (configs/)
from common import train_export_evaluate  # noqa: E402

from configs.quickstart import get_config  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--epochs', type=float, default=30.0)
  ap.add_argument('--smoke', action='store_true', help='0.01 epochs')
  args = ap.parse_args()
  if args.smoke:
    args.epochs = 0.01
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, dense in (('pemn_rp', False), ('dense', True)):
      cfg = get_config(f'dense={dense},epochs={args.epochs}')
      rows += train_export_evaluate(cfg, tmp, name, ('f32', 'f16', 'bf16', 'grid8', 'grid6'))
  base = next(r for r in rows if r['method'] == 'dense' and r['float_codec'] == 'f32')
  for r in rows:
    print(f'{r["method"]}/{r["float_codec"]} file_bytes={r["file_bytes"]} '
          f'size_ratio_to_dense_file={r["file_bytes"] / base["file_bytes"]:.4f} '
          f'accuracy={r["accuracy"]:.4f}')


if __name__ == '__main__':
  main()
