"""K seed variants of one config: one vmapped sweep vs the same K runs one by one.

    .venv/bin/python benchmarks/ablate_speed.py
    .venv/bin/python benchmarks/ablate_speed.py --config X.py[:ARGS] --k 8 --steps 300
    .venv/bin/python benchmarks/ablate_speed.py --in_process
    .venv/bin/python benchmarks/ablate_speed.py --jitted

By default each side runs as a user runs it, in processes of its own: one
``python -m pemn_jax.ablate`` command (the K variants as one vmapped step)
against K ``python -m pemn_jax.main`` commands, one after another (the same
configs: ``--config.seed=i``, the sweep's shared ``--config.data_seed`` and the
same settings). Each is timed from its
start to its exit (Python and JAX start-up, data loading, compilation,
training, the final evaluation, checkpoints), with the environment the
benchmark was started with. ``--in_process`` times both sides in this
process instead (the sweep first; then one-time costs -- imports, the
compilation of helpers every run shares -- fall on the sweep alone).

Also reported: the steady-state time per training step (compilation and
evaluation excluded, from the runs' metrics) of one vmapped step over K
variants vs K single steps. Results are checked equal (final test accuracy
of every variant within 2 points of its single run: float rounding differs
between the batched and the single step, and training amplifies it). Data
is prepared before either side is timed. Last line:

    ablate K=<k> vmapped_s=<a> sequential_s=<b> speedup=<b/a>

``--jitted`` times instead the steps alone: the trainer's stacked step over
K variants against K calls of its single step, each jitted (compiled
once, outside the timing) on one batch, alternated over rounds; last line
``ablate_jitted K=<k> stacked_step_s=<a> single_steps_s=<b> ratio=<b/a>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, REPO)
BASE_ENV = dict(os.environ)  # as the user started this process: what each side's process gets

from pemn_jax.kernels import cpu_tuning  # noqa: E402

cpu_tuning.configure()


def step_seconds(run_dir: str, batch: int) -> float:
  """Median training step time from a run's metrics (first log window dropped:
  it holds the compilation)."""
  import numpy as np
  rates = [r['images_per_s'] for r in records(run_dir) if 'images_per_s' in r]
  rates = rates[1:] or rates
  return float(np.median([batch / r for r in rates]))


def records(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


def final_accuracy(run_dir: str) -> float:
  """The run's last evaluation, from its metrics."""
  return [r for r in records(run_dir) if 'test_accuracy' in r][-1]['test_accuracy']


def command(args: list[str], what: str) -> float:
  """Runs ``python -m ...args`` in its own process; its wall seconds."""
  t0 = time.time()
  p = subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=BASE_ENV,
                     capture_output=True, text=True, check=False)
  if p.returncode:
    raise SystemExit(f'{what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}')
  return time.time() - t0


def separate(config: str, sweep: str, sets: list[str], tmp: str, variants
             ) -> tuple[float, float]:
  """(sweep seconds, one-by-one seconds), each side in its own processes."""
  vmapped = command(['pemn_jax.ablate', '--config', config, '--workdir',
                     os.path.join(tmp, 'sweep'), f'--sweep={sweep}', '--noplots',
                     *(f'--set={s}' for s in sets)], 'the sweep')
  print(f'# sweep: {vmapped:.1f} s', flush=True)
  sequential = 0.0
  for v in variants:
    sequential += command(['pemn_jax.main', '--config', config, '--workdir',
                           os.path.join(tmp, v.name), f'--config.seed={v.config.seed}',
                           f'--config.data_seed={v.config.data_seed}',
                           *(f'--config.{s}' for s in sets)], f'run {v.name}')
  return vmapped, sequential


def in_process(config: str, sweep: str, sets: list[str], tmp: str, variants):
  from pemn_jax.sweep import run_sweep
  from pemn_jax.train.loop import train_and_evaluate
  t0 = time.time()
  run_sweep(config, [sweep], os.path.join(tmp, 'sweep'), say=lambda m: None, plots=False,
            overrides=sets)
  vmapped = time.time() - t0
  t0 = time.time()
  for v in variants:
    train_and_evaluate(v.config, os.path.join(tmp, v.name))
  return vmapped, time.time() - t0


def jitted(config, k: int, rounds: int, calls: int) -> tuple[float, float]:
  """(stacked step seconds, K single steps' seconds): medians over
  ``rounds`` alternated rounds of ``calls`` back-to-back calls each."""
  import statistics

  import jax
  import jax.numpy as jnp
  import numpy as np

  from pemn_jax.train import loop
  from pemn_jax.train.run import Run
  run = Run.build(config)
  single, _ = loop.step_functions(run)
  stacked, _ = loop.step_functions(run, stacked=True)
  single, stacked = jax.jit(single), jax.jit(stacked)
  batch = run.pipe.raw_batch(0)
  states = [run.init_state(jax.random.key(i), np.uint32(i)) for i in range(k)]
  many = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def seconds(step, ts):
    jax.block_until_ready(step(ts, {}, *batch, np.uint32(0)))  # compiled here
    t0 = time.perf_counter()
    for _ in range(calls):
      out = step(ts, {}, *batch, np.uint32(0))
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls

  times = [(seconds(stacked, many), len(states) * seconds(single, states[0]))
           for _ in range(rounds)]
  return tuple(statistics.median(t) for t in zip(*times, strict=True))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/quickstart.py')
  ap.add_argument('--k', type=int, default=8, help='seed variants')
  ap.add_argument('--steps', type=int, default=300, help='training steps per variant')
  ap.add_argument('--in_process', action='store_true',
                  help='both sides in this process (default: each as its commands, alone)')
  ap.add_argument('--jitted', action='store_true',
                  help='time the jitted steps alone (one stacked vs K single steps)')
  ap.add_argument('--smoke', action='store_true', help='K=2, a few steps on a data slice')
  args = ap.parse_args(argv)
  import jax

  from pemn_jax.sweep import expand, parse_sweeps
  k, steps = (2, 4) if args.smoke else (args.k, args.steps)
  log_every = 1 if args.smoke else max(1, steps // 10)
  sets = [f'num_steps={steps}', f'log_every={log_every}', 'eval_every=0',
          f'checkpoint_every={steps}']
  if args.smoke:
    sets += ['train_limit=512', 'test_limit=200', 'batch_size=32', 'eval_batch_size=100']
  sweep = 'seed=' + ','.join(map(str, range(k)))  # both sides train these variants
  variants = expand(args.config, parse_sweeps([sweep]), sets)
  if [int(v.config.seed) for v in variants] != list(range(k)):
    raise SystemExit('the variants are not seeds 0..k-1 in order')
  batch = variants[0].config.batch_size
  how = ('jitted steps alone' if args.jitted else
         'in this process' if args.in_process else 'each side in its own processes')
  print(f'# {args.config}, K={k} seeds, {steps} steps of batch {batch}, {how}, '
        f'{jax.device_count()} device(s), jax {jax.__version__}', flush=True)
  if args.jitted:
    a, b = jitted(variants[0].config, k, 2 if args.smoke else 5, 2 if args.smoke else 30)
    print(f'ablate_jitted K={k} stacked_step_s={a:.4f} single_steps_s={b:.4f} '
          f'ratio={b / a:.2f}')
    return
  with tempfile.TemporaryDirectory() as tmp:
    # Data prepared before either side is timed.
    from pemn_jax.data import sources
    c = variants[0].config
    for split in ('train', 'test'):
      sources.load(c.dataset, split, c.data_dir, c.source_dir)
    vmapped, sequential = (in_process if args.in_process else separate)(
        args.config, sweep, sets, tmp, variants)
    swept = [final_accuracy(os.path.join(tmp, 'sweep', v.name)) for v in variants]
    single = [final_accuracy(os.path.join(tmp, v.name)) for v in variants]
    worst = max(abs(a - b) for a, b in zip(swept, single, strict=True))
    v_step = step_seconds(os.path.join(tmp, 'sweep', variants[0].name), batch)
    s_step = sum(step_seconds(os.path.join(tmp, v.name), batch) for v in variants)
  print('# final test accuracy, vmapped: ' + ' '.join(f'{100 * a:.2f}' for a in swept),
        flush=True)
  print('# final test accuracy, one by one: ' + ' '.join(f'{100 * a:.2f}' for a in single),
        flush=True)
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
