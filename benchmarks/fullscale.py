"""The full-scale configs (configs/full/*.py) without their data or hardware:
each one's train step compiled at its global batch on its intended device
count (``JAX_NUM_CPU_DEVICES``), with XLA's per-device memory
(``memory_analysis``) and FLOPs (``cost_analysis``), the run's length, and an
estimated time from the FLOPs; then 2 training steps at a small batch on
generated data of the config's shape.

    python benchmarks/fullscale.py
    python benchmarks/fullscale.py --configs configs/full/pemn_convmixer_cifar10.py --train_batch 8

(``--smoke``: the ConvMixer config alone, checks the script.)

Last line per config: ``fullscale <config> devices= per_device_mb=
gflop_per_step= steps= est_hours= loss=`` (loss: the second step's). The
estimate assumes every device sustains ``--tflops`` (default 62: 40% of an
A100's 156 TFLOP/s TF32): a stated assumption and a lower bound (small
convolutions reach far less), not a measurement. The step is compiled under
``kernels.conv.forced('xla')``: XLA's convolutions, as on an accelerator.
Memory is XLA:CPU's buffer assignment, a proxy for an accelerator's; XLA counts
a grouped (depthwise) convolution's FLOPs as a dense one's, so ConvMixer's
figure is high.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# LLVM at -O0: compiles ~3x faster on CPU; XLA's buffer assignment (memory) is the same.
FAST = {'xla_backend_optimization_level': 0}
TRAIN_EXAMPLES = {'imagenet': 1_281_167, 'cifar10': 50_000, 'cifar100': 50_000}


def _devices(path: str) -> int:
  import importlib.util
  spec = importlib.util.spec_from_file_location('fullscale_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return int(module.DEVICES)


def one(path: str, train_batch: int, tflops: float) -> str:
  """Runs in a process with the config's device count (see ``main``)."""
  import jax

  from pemn_jax.data import sources
  from pemn_jax.kernels import conv
  from pemn_jax.sweep.spec import load_config
  from pemn_jax.train.loop import compile_train_step
  from pemn_jax.train.run import Run

  config = load_config(path)
  shape = sources.image_shape(config.dataset, config.image_size)
  kind = 'imagenet' if 'imagenet' in config.dataset or config.dataset.startswith('folder:') \
      else config.dataset.split(':')[-1]
  classes = 1000 if kind == 'imagenet' else (100 if kind == 'cifar100' else 10)

  def data(n):
    return sources.generated(n, shape, classes), sources.generated(max(8, jax.device_count()),
                                                                   shape, classes, seed=1)

  full = Run.build(config, datasets=data(config.batch_size))
  t0 = time.time()
  with conv.forced('xla'):  # the program an accelerator runs: XLA's convolutions, no CPU kernels
    compiled = compile_train_step(full, FAST)
  t_compile = time.time() - t0
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get('flops', 0.0))
  steps = int(config.num_epochs * (TRAIN_EXAMPLES[kind] // config.batch_size))
  hours = steps * flops / (tflops * 1e12) / 3600
  print(f'{os.path.basename(path)}: {config.model} x {config.param.name}, global batch '
        f'{config.batch_size} at {shape}, {jax.device_count()} devices; per device: '
        f'{per_device / 2**20:.1f} MiB (arguments {mem.argument_size_in_bytes / 2**20:.1f}, '
        f'temporaries {mem.temp_size_in_bytes / 2**20:.1f}), {flops / 1e9:.1f} GFLOP per step; '
        f'{steps} steps', flush=True)
  small = config.copy_and_resolve_references()
  small.batch_size = train_batch
  run = Run.build(small, datasets=data(2 * train_batch))
  t0 = time.time()
  with conv.forced('xla'):
    losses = _two_steps(run, small.seed)
  print(f'  (compile at the global batch {t_compile:.0f} s; 2 steps at batch {train_batch} '
        f'{time.time() - t0:.0f} s: losses {losses})', flush=True)
  return (f'fullscale {os.path.basename(path)} devices={jax.device_count()} '
          f'per_device_mb={per_device / 2**20:.1f} gflop_per_step={flops / 1e9:.1f} '
          f'steps={steps} est_hours={hours:.2f} loss={losses[-1]:.4g}')


def _two_steps(run, seed: int) -> list[float]:
  """The losses of 2 training steps: the loop's step on the pipeline's batches."""
  import jax
  import numpy as np

  from pemn_jax.train.loop import compile_train_step, state_layout
  _, shardings = state_layout(run)
  ts = jax.jit(run.init_state, out_shardings=shardings)(jax.random.key(seed), np.uint32(seed))
  train_step, losses = compile_train_step(run), []
  for step in range(2):
    batch = [None if a is None else jax.device_put(a, run.layout.batch)
             for a in run.pipe.raw_batch(step)]
    ts, metrics = train_step(ts, {}, *batch, np.uint32(step))
    losses.append(float(metrics['loss']))
  return losses


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--configs', nargs='*', default=None,
                      help='config files (default: configs/full/*.py)')
  parser.add_argument('--train_batch', type=int, default=8,
                      help='global batch of the 2 training steps')
  parser.add_argument('--tflops', type=float, default=62.0,
                      help='sustained TFLOP/s per device assumed for the time estimate')
  parser.add_argument('--smoke', action='store_true', help='one config (checks the script)')
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(one(args.one, args.train_batch, args.tflops), flush=True)
    return
  paths = args.configs or sorted(glob.glob(os.path.join(REPO, 'configs', 'full', '*.py')))
  if args.smoke:
    paths = [os.path.join(REPO, 'configs', 'full', 'pemn_convmixer_cifar10.py')]
  print('# python ' + ' '.join(['benchmarks/fullscale.py', *sys.argv[1:]]))
  print(f'# estimate: steps x FLOPs per device / ({args.tflops:g} TFLOP/s); memory and FLOPs '
        'from XLA:CPU')
  for path in paths:
    env = {**os.environ, 'JAX_NUM_CPU_DEVICES': str(_devices(path)), 'JAX_PLATFORMS': 'cpu',
           'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
    out = subprocess.run([sys.executable, __file__, '--one', path, '--train_batch',
                          str(args.train_batch), '--tflops', str(args.tflops)], env=env,
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
      sys.exit(f'{path} failed:\n{out.stderr[-3000:]}')
    print(out.stdout.strip(), flush=True)


if __name__ == '__main__':
  main()
