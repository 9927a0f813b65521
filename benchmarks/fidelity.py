"""Each method's default preset, as its reference code trains it, on real data.

Every preset (configs/*.py with only model, dataset and epochs set) trains with
the same budget (epochs, batch 128) on MNIST and Fashion-MNIST; the test
accuracy is evaluated after every epoch; best-over-training and final are
both reported (the PEMN reference reports best; the others final).

    .venv/bin/python benchmarks/fidelity.py                      # MLP, 3 epochs, ~4 min
    .venv/bin/python benchmarks/fidelity.py --model lenet5       # ~9 min
    .venv/bin/python benchmarks/fidelity.py --smoke               # a few steps each

Writes OUT/fidelity_<model>.md. Last lines, one per run:
    <dataset>/<method> best=<a> final=<b> steps=<n>
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]  # the repo root (configs/)

PRESETS = {  # method -> (config module, extra config argument)
    'dense': ('dense', ''),
    'rpg_1pct': ('rpg', 'dof=0.01'),                               # stem/classifier dense
    'rpg_1pct_all': ('rpg', 'dof=0.01,generate=@kernels'),         # every kernel generated
    'edge_popup': ('edge_popup', ''),
    'supermask': ('edge_popup', 'kind=supermask'),
    'pemn_rp1e-3': ('pemn', 'mode=rp,ratio=1e-3'),
    'pemn_rp1e-2': ('pemn', 'mode=rp,ratio=1e-2'),
    'pemn_mp': ('pemn', 'mode=mp'),
    'pemn_ol': ('pemn', 'mode=ol'),
}


def make_config(method: str, model: str, dataset: str, epochs: float, args):
  import importlib
  module, extra = PRESETS[method]
  arg = f'model={model},dataset={dataset},epochs={epochs}' + (f',{extra}' if extra else '')
  c = importlib.import_module(f'configs.{module}').get_config(arg)
  c.log_every = 10_000
  c.checkpoint_every = 1_000_000
  c.data_dir = args.data_dir
  if args.smoke:
    c.num_steps, c.train_limit, c.test_limit, c.eval_every = 4, 512, 500, 2
  return c


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', default='mlp')
  ap.add_argument('--datasets', nargs='+', default=['mnist', 'fashion_mnist'])
  ap.add_argument('--methods', nargs='+', default=list(PRESETS), choices=list(PRESETS))
  ap.add_argument('--epochs', type=float, default=3.0)
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--out', default='benchmarks/results')
  ap.add_argument('--smoke', action='store_true',
                  help='4 methods on one dataset, 4 steps each (checks the script)')
  args = ap.parse_args()

  from pemn_jax.train.loop import train_and_evaluate

  if args.smoke:  # a few methods on one dataset
    args.datasets = args.datasets[:1]
    args.methods = [m for m in args.methods if m in ('dense', 'rpg_1pct', 'supermask',
                                                     'pemn_rp1e-3')]

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for dataset in args.datasets:
      for method in args.methods:
        c = make_config(method, args.model, dataset, args.epochs, args)
        if not args.smoke:  # evaluate once per epoch
          steps_per_epoch = 60_000 // c.batch_size
          c.eval_every = steps_per_epoch
        t0 = time.time()
        out = train_and_evaluate(c, os.path.join(tmp, f'{dataset}_{method}'))
        if out['stopped']:  # SIGTERM/SIGINT: stop the benchmark too
          raise SystemExit(f'{dataset}/{method}: stopped at step {out["step"]} by a signal')
        rows.append({'dataset': dataset, 'method': method, 'best': out['best_test_accuracy'],
                     'best_step': out['best_step'], 'final': out['test_accuracy'],
                     'steps': out['step'], 'seconds': time.time() - t0,
                     'model_bytes': out['model_bytes']})
        r = rows[-1]
        print(f'# {dataset}/{method}: best {r["best"]:.4f} (step {r["best_step"]}) final '
              f'{r["final"]:.4f} in {r["seconds"]:.0f}s', flush=True)
  table = [f'{args.model}, {args.epochs} epochs, batch 128, presets of configs/*.py; test '
           'accuracy best over per-epoch evaluations and final', '',
           '| dataset | method | best | final | steps | model bytes | seconds |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  table += [f'| {r["dataset"]} | {r["method"]} | {100 * r["best"]:.2f}% | '
            f'{100 * r["final"]:.2f}% | {r["steps"]} | {r["model_bytes"]} | {r["seconds"]:.0f} |'
            for r in rows]
  if not args.smoke:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f'fidelity_{args.model}.md'), 'w') as f:
      f.write('\n'.join(table) + '\n')
  print('\n'.join(table))
  for r in rows:
    print(f'{r["dataset"]}/{r["method"]} best={r["best"]:.4f} final={r["final"]:.4f} '
          f'steps={r["steps"]}')


if __name__ == '__main__':
  main()
