"""K seed variants of one config: one vmapped sweep vs the same K runs one by one.

    .venv/bin/python benchmarks/ablate_speed.py
    .venv/bin/python benchmarks/ablate_speed.py --config X.py[:ARGS] --k 8 --steps 300

Both sides train the same K configs (the sweep's variants; each single run
is the trainer on that variant's stored config) on real data, in this
process, with the same evaluation at the end, and both include their
compilation (a user running K commands compiles K times). Also reported:
the steady-state time per training step (compilation and evaluation
excluded, from the runs' metrics) of one vmapped step over K variants vs
K single steps. Results are checked equal (final test accuracy of every
variant within 2 points of its single run: float rounding differs between
the batched and the single step, and training amplifies it). Last line:

    ablate K=<k> vmapped_s=<a> sequential_s=<b> speedup=<b/a>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from pemn_jax.kernels import cpu_tuning  # noqa: E402

cpu_tuning.configure()


def step_seconds(run_dir: str, batch: int) -> float:
  """Median training step time from a run's metrics (first log window dropped:
  it holds the compilation)."""
  import numpy as np
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    rates = [r['images_per_s'] for r in map(json.loads, f) if 'images_per_s' in r]
  rates = rates[1:] or rates
  return float(np.median([batch / r for r in rates]))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/quickstart.py')
  ap.add_argument('--k', type=int, default=8, help='seed variants')
  ap.add_argument('--steps', type=int, default=300, help='training steps per variant')
  ap.add_argument('--smoke', action='store_true', help='K=2, a few steps on a data slice')
  args = ap.parse_args(argv)
  import jax

  from pemn_jax.sweep import expand, parse_sweeps, run_sweep
  from pemn_jax.train.loop import train_and_evaluate
  k, steps = (2, 4) if args.smoke else (args.k, args.steps)
  log_every = 1 if args.smoke else max(1, steps // 10)
  sets = [f'num_steps={steps}', f'log_every={log_every}', 'eval_every=0',
          f'checkpoint_every={steps}']
  if args.smoke:
    sets += ['train_limit=512', 'test_limit=200', 'batch_size=32', 'eval_batch_size=100']
  sweeps = [f'seed={",".join(str(i) for i in range(k))}']
  variants = expand(args.config, parse_sweeps(sweeps), sets)
  batch = variants[0].config.batch_size
  print(f'# {args.config}, K={k} seeds, {steps} steps of batch {batch}, '
        f'{jax.device_count()} device(s), jax {jax.__version__}', flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    # Data prepared before either side is timed.
    from pemn_jax.data import sources
    c = variants[0].config
    for split in ('train', 'test'):
      sources.load(c.dataset, split, c.data_dir, c.source_dir)
    t0 = time.time()
    swept = run_sweep(args.config, sweeps, os.path.join(tmp, 'sweep'), say=lambda m: None,
                      plots=False, overrides=sets)
    vmapped = time.time() - t0
    t0 = time.time()
    single = [train_and_evaluate(v.config, os.path.join(tmp, v.name)) for v in variants]
    sequential = time.time() - t0
    worst = max(abs(a['test_accuracy'] - b['test_accuracy']) for a, b in zip(swept, single))
    v_step = step_seconds(os.path.join(tmp, 'sweep', variants[0].name), batch)
    s_step = sum(step_seconds(os.path.join(tmp, v.name), batch) for v in variants)
  print('# final test accuracy, vmapped: '
        + ' '.join(f'{100 * r["test_accuracy"]:.2f}' for r in swept), flush=True)
  print('# final test accuracy, one by one: '
        + ' '.join(f'{100 * r["test_accuracy"]:.2f}' for r in single), flush=True)
  print(f'# largest accuracy difference {100 * worst:.2f} points', flush=True)
  if worst > 0.02:
    print('error: the vmapped variants do not reproduce the single runs', file=sys.stderr)
    sys.exit(1)
  print(f'ablate_step K={k} vmapped_step_s={v_step:.4f} sequential_steps_s={s_step:.4f} '
        f'speedup={s_step / v_step:.2f}')
  print(f'ablate K={k} vmapped_s={vmapped:.1f} sequential_s={sequential:.1f} '
        f'speedup={sequential / vmapped:.2f}')


if __name__ == '__main__':
  main()
