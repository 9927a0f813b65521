"""Mixed precision: each preset trained in float32 and in bfloat16 on CPU.

The acceptance check of ``config.dtype``: 20k MNIST images, 600 steps (batch
128), MLP; dense, RPG (1% DoF), edge-popup, supermask and PEMN RP (1e-3), each
in ``dtype=float32`` and ``dtype=bfloat16`` (bfloat16 activations and
matmuls; the trained state, optimizer state and loss float32), with the same
seed and batches. Reports final and best test accuracy of both and their gap
(final accuracy, the issue's measure; bfloat16 on XLA:CPU is emulated, so the
seconds say nothing about an accelerator).

    .venv/bin/python benchmarks/mixed_precision.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/mixed_precision.py --smoke    # a few steps each

Writes OUT/mixed_precision.md (not under --smoke). Last lines, one per preset:
    <method> float32=<a> bfloat16=<b> gap=<b-a>
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]  # the repo root (configs/), benchmarks/

METHODS = ('dense', 'rpg_1pct', 'edge_popup', 'supermask', 'pemn_rp1e-3')


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
  ap.add_argument('--train_limit', type=int, default=20_000)
  ap.add_argument('--steps', type=int, default=600)
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--out', default='benchmarks/results')
  ap.add_argument('--smoke', action='store_true', help='4 steps each (checks the script)')
  args = ap.parse_args()

  from fidelity import make_config

  from pemn_jax.train.loop import train_and_evaluate

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for method in args.methods:
      row = {'method': method}
      for dtype in ('float32', 'bfloat16'):
        c = make_config(method, 'mlp', 'mnist', 1.0, args)
        c.num_steps, c.dtype = args.steps, dtype  # num_steps overrides num_epochs
        c.train_limit, c.test_limit = args.train_limit, None
        c.eval_every = 100
        if args.smoke:
          c.num_steps, c.train_limit, c.test_limit, c.eval_every = 4, 512, 500, 2
        t0 = time.time()
        out = train_and_evaluate(c, os.path.join(tmp, f'{method}_{dtype}'))
        if out['stopped']:
          raise SystemExit(f'{method}/{dtype}: stopped at step {out["step"]} by a signal')
        row[dtype] = (out['test_accuracy'], out['best_test_accuracy'], time.time() - t0)
        print(f'# {method} {dtype}: final {out["test_accuracy"]:.4f} '
              f'best {out["best_test_accuracy"]:.4f} in {time.time() - t0:.0f} s', flush=True)
      rows.append(row)

  cmd = shlex.join(['python', *sys.argv])  # as it was run
  lines = [f'# Mixed precision on CPU: {args.train_limit} MNIST images, {args.steps} steps, MLP',
           '', f'    {cmd}', '',
           '| preset | float32 final (best) | bfloat16 final (best) | gap (final) |',
           '| --- | --- | --- | --- |']
  for r in rows:
    (a, ab, _), (b, bb, _) = r['float32'], r['bfloat16']
    lines.append(f'| {r["method"]} | {100 * a:.2f}% ({100 * ab:.2f}%) | '
                 f'{100 * b:.2f}% ({100 * bb:.2f}%) | {100 * (b - a):+.2f} |')
  if not args.smoke:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'mixed_precision.md'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  for r in rows:
    a, b = r['float32'][0], r['bfloat16'][0]
    print(f'{r["method"]} float32={a:.4f} bfloat16={b:.4f} gap={b - a:+.4f}')


if __name__ == '__main__':
  main()
