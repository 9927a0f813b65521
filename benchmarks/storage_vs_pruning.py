"""Accuracy vs stored size: PEMN against full-strength pruning baselines.

Every point trains with the same budget (epochs, batch 128) from the presets
of configs/*.py, is exported with the same exporter, and is evaluated *from
the model file on disk* (the final state); the best test accuracy during
training (evaluated every epoch) is reported beside it. Compression = dense
float32 params bytes / file bytes.

* PEMN (configs/pemn.py): frozen prototype (MP, RP 1e-1, 1e-2, 1e-3) + learned
  50% masks.
* Pruning (configs/dense.py: dense weights trained with the dense preset's
  optimizer):
  ``magnitude`` = train -> prune at half the run -> fine-tune (Han et al.),
  ``gmp`` = gradual magnitude pruning (Zhu & Gupta) from 10% to 60% of the run;
  allocation ``global`` (one threshold) with the first layer kept dense (as
  most papers), ``erk``, or ``uniform`` over every layer; ``random`` pruning
  as the floor. Files store surviving floats + their positions (bitmap,
  arithmetic-coded bitmap or uint32 indices, whichever is smallest).
* Dense: the reference accuracy.

With ``--float_bits B`` every point is also exported with its floats (PEMN's
prototype and biases, pruning's surviving weights, dense weights) on an
entropy-coded B-bit grid (``export --float_bits B``), evaluated from that
file too: the comparison at equal storage of the floats.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/storage_vs_pruning.py               # LeNet-5/MNIST, 8 epochs
    .venv/bin/python benchmarks/storage_vs_pruning.py --smoke       # a few steps per point

Writes OUT/storage_vs_pruning.md and .png (``..._grid<B>`` with
``--float_bits``). Last lines, one per point and file:
    <method>[/grid<B>] compression=<x> file_bytes=<n> accuracy=<final, from the file> best=<y>
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # benchmarks/ and the repo root (configs/)
from common import train_export_evaluate  # noqa: E402

PEMN = {'pemn_mp': 'mode=mp', 'pemn_rp1e-1': 'mode=rp,ratio=0.1',
        'pemn_rp1e-2': 'mode=rp,ratio=0.01', 'pemn_rp1e-3': 'mode=rp,ratio=0.001'}
PRUNING = {  # name -> config argument of configs/dense.py
    'magnitude-global': 'prune=magnitude,allocation=global,skip_first=true',
    'gmp-global': 'prune=gmp,allocation=global,skip_first=true',
    'magnitude-erk': 'prune=magnitude,allocation=erk,skip_first=false',
    'magnitude-uniform': 'prune=magnitude,allocation=uniform,skip_first=false',
    'random-uniform': 'prune=random,allocation=uniform,skip_first=false',
}


def point_configs(args) -> dict[str, tuple[str, str]]:
  """name -> (config module, config argument)."""
  base = f'model={args.model},dataset={args.dataset},epochs={args.epochs}'
  out = {'dense': ('dense', base)}
  out.update({k: ('pemn', f'{base},{v}') for k, v in PEMN.items()})
  for name, arg in PRUNING.items():
    for s in args.sparsities:
      out[f'{name}-{round(100 * s)}'] = ('dense', f'{base},{arg},sparsity={s}')
  return out


def make_config(module: str, arg: str, args):
  c = importlib.import_module(f'configs.{module}').get_config(arg)
  if c.prune.criterion == 'gmp':
    c.prune.update(begin_fraction=0.1, end_fraction=0.6)
  c.log_every = 100_000
  c.checkpoint_every = 1_000_000
  c.eval_every = 60_000 // c.batch_size  # every epoch (60k training images)
  c.data_dir = args.data_dir
  if args.smoke:
    c.num_steps, c.train_limit, c.test_limit, c.eval_every = 4, 512, 500, 2
  return c


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  groups = {}
  for r in rows:
    base = 'pemn' if r['method'].startswith('pemn') else r['method'].rsplit('-', 1)[0]
    groups.setdefault((base, r['float_codec']), []).append(r)
  colors = {}  # one colour a method; its grid-stored files dashed
  for (base, codec), rs in groups.items():
    rs = sorted(rs, key=lambda r: r['compression'])
    color = colors.setdefault(base, f'C{len(colors)}')
    ax.plot([r['compression'] for r in rs], [100 * r['accuracy'] for r in rs],
            'o-' if codec == 'f32' else 's--', color=color,
            label=base if codec == 'f32' else f'{base} ({codec})')
  ax.set_xscale('log')
  ax.set_xlabel('compression (dense float32 bytes / file bytes)')
  ax.set_ylabel('test accuracy from the file, final (%)')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--dataset', default='mnist')
  ap.add_argument('--model', default='lenet5')
  ap.add_argument('--epochs', type=float, default=8.0)
  ap.add_argument('--sparsities', type=float, nargs='+', default=[0.90, 0.92, 0.94, 0.96])
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--only', default='', help='comma-separated subset of point names')
  ap.add_argument('--out', default='benchmarks/results')
  ap.add_argument('--smoke', action='store_true',
                  help='3 points, 4 steps each (checks the script)')
  ap.add_argument('--float_bits', type=int, default=None,
                  help='also export every point with its floats on a grid of these bits')
  args = ap.parse_args()
  rows = []
  points = point_configs(args)
  if args.smoke:  # one point of each kind
    first = f'magnitude-global-{round(100 * args.sparsities[0])}'
    points = {k: v for k, v in points.items() if k in ('dense', 'pemn_rp1e-3', first)}
  if args.only:
    points = {k: v for k, v in points.items() if k in args.only.split(',')}
  codecs = ('f32',) + ((f'grid{args.float_bits}',) if args.float_bits else ())
  with tempfile.TemporaryDirectory() as tmp:
    for name, (module, arg) in points.items():
      rows += train_export_evaluate(make_config(module, arg, args), tmp, name, codecs)
  for r in rows:
    r['name'] = r['method'] + ('' if r['float_codec'] == 'f32' else f'/{r["float_codec"]}')
  n = rows[-1]['num_params']
  table = [f'{args.model} on {args.dataset}, {args.epochs} epochs, batch 128, N={n} '
           f'(dense float32: {4 * n} bytes). accuracy = final state, evaluated from the file; '
           'best = best per-epoch evaluation during training', '',
           '| method | compression | file bytes | accuracy (final, file) | best |',
           '| --- | --- | --- | --- | --- |']
  table += [f'| {r["name"]} | {r["compression"]:.1f}x | {r["file_bytes"]} | '
            f'{100 * r["accuracy"]:.2f}% | {100 * r["best_accuracy"]:.2f}% |' for r in rows]
  if not args.smoke:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, 'storage_vs_pruning' + (f'_grid{args.float_bits}'
                                                            if args.float_bits else ''))
    with open(stem + '.md', 'w') as f:
      f.write('\n'.join(table) + '\n')
    try:
      plot(rows, stem + '.png')
    except ImportError:
      print('# matplotlib missing: no plot (pip install -e .[bench])')
  print('\n'.join(table))
  for r in rows:
    print(f'{r["name"]} compression={r["compression"]:.2f} file_bytes={r["file_bytes"]} '
          f'accuracy={r["accuracy"]:.4f} best={r["best_accuracy"]:.4f}')


if __name__ == '__main__':
  main()
