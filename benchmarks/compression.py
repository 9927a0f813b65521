"""Accuracy vs compression: PEMN against pruning baselines at matched storage.

Trains each point (same model, data and epochs), exports it with the same
exporter and measures the model file on disk; accuracy is evaluated from the
file. Compression = dense float32 params bytes / file bytes.

* PEMN: frozen prototype (MP, RP 1e-1, 1e-2, 1e-3) + learned 50% masks.
* Pruning (weights trained, sparse): magnitude at init, random, and gradual
  magnitude pruning (GMP), at 90/92/94/96% sparsity. Files store surviving
  floats + their positions (bitmap, arithmetic-coded bitmap or uint32 indices,
  whichever is smallest).
* Dense: the reference accuracy.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/compression.py --dataset mnist --model lenet5 --epochs 3

Writes OUT/compression.md and OUT/compression.png. Last lines, one per point:
    <method> compression=<x> file_bytes=<n> accuracy=<y>
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import train_export_evaluate  # noqa: E402

from pemn_jax.config import base_config  # noqa: E402


def point_configs(args):
  pemn = {f'pemn_{n}': {'name': 'masked', 'keep': 0.5,
                        'source': {'name': 'prototype', 'mode': m, 'ratio': r}}
          for n, m, r in [('mp', 'mp', 1e-3), ('rp1e-1', 'rp', 1e-1), ('rp1e-2', 'rp', 1e-2),
                          ('rp1e-3', 'rp', 1e-3)]}
  out = {'dense': ({'name': 'dense'}, None)}
  out.update({k: (v, None) for k, v in pemn.items()})
  for crit in ('magnitude', 'random', 'gmp'):
    for s in args.sparsities:
      out[f'{crit}_{round(100 * s)}'] = ({'name': 'dense'}, (crit, s))
  return out


def make_config(args, spec, prune):
  c = base_config()
  c.dataset, c.model = args.dataset, args.model
  c.augment = 'cifar' in args.dataset
  c.param = spec
  if spec['name'] == 'masked':  # PEMN settings
    c.optimizer.update(name='adamw', lr=0.05, weight_decay=5e-3, schedule='onecycle')
  else:
    c.optimizer.update(name='adamw', lr=2e-3, weight_decay=1e-4, schedule='onecycle')
  if prune:
    c.prune.criterion, c.prune.sparsity = prune
    c.prune.every = 100
  c.batch_size = args.batch
  c.num_epochs = args.epochs
  c.log_every = 10_000
  c.checkpoint_every = 1_000_000
  c.data_dir = args.data_dir
  return c


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  groups = {}
  for r in rows:
    groups.setdefault(r['method'].split('_')[0], []).append(r)
  for name, rs in groups.items():
    rs = sorted(rs, key=lambda r: r['compression'])
    ax.plot([r['compression'] for r in rs], [100 * r['accuracy'] for r in rs], 'o-', label=name)
  ax.set_xscale('log')
  ax.set_xlabel('compression (dense float32 bytes / file bytes)')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--dataset', default='mnist')
  ap.add_argument('--model', default='lenet5')
  ap.add_argument('--epochs', type=float, default=3.0)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--sparsities', type=float, nargs='+', default=[0.90, 0.92, 0.94, 0.96])
  ap.add_argument('--data_dir', default='')
  ap.add_argument('--only', default='', help='comma-separated subset of point names')
  ap.add_argument('--out', default='benchmarks/results')
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows = []
  points = point_configs(args)
  if args.only:
    points = {k: v for k, v in points.items() if k in args.only.split(',')}
  with tempfile.TemporaryDirectory() as tmp:
    for name, (spec, prune) in points.items():
      rows += train_export_evaluate(make_config(args, spec, prune), tmp, name)
  n = rows[-1]['num_params']
  table = [f'{args.model} on {args.dataset}, {args.epochs} epochs, N={n} '
           f'(dense float32: {4 * n} bytes)', '',
           '| method | compression | file bytes | test accuracy |', '| --- | --- | --- | --- |']
  table += [f'| {r["method"]} | {r["compression"]:.1f}x | {r["file_bytes"]} | '
            f'{100 * r["accuracy"]:.2f}% |' for r in rows]
  with open(os.path.join(args.out, 'compression.md'), 'w') as f:
    f.write('\n'.join(table) + '\n')
  try:
    plot(rows, os.path.join(args.out, 'compression.png'))
  except ImportError:
    print('# matplotlib missing: no plot (pip install -e .[bench])')
  print('\n'.join(table))
  for r in rows:
    print(f'{r["method"]} compression={r["compression"]:.2f} file_bytes={r["file_bytes"]} '
          f'accuracy={r["accuracy"]:.4f}')


if __name__ == '__main__':
  main()
