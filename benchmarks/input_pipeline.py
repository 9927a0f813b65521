"""Is the trainer bounded by its step or by Python? Images/s of the trainer
(``config.prefetch`` 0 and 2) vs its jitted train step alone.

For each workload, in one process: the train step alone (the trainer's own
``make_train_step``, jitted with the state donated) on one batch already on
the device, timed over ``--steps`` steps; and the trainer itself
(``train_and_evaluate``) for ``--steps`` steps after a warm-up interval, with
batches built inline (``prefetch=0``) and on a background thread
(``prefetch=2``, the default). Each is repeated ``--repeats`` times, rounds
interleaved; medians reported. The trainer's images/s come from its
metrics.jsonl (``images_per_s`` of each logging interval after the first,
which holds the compilation).

    .venv/bin/python benchmarks/input_pipeline.py
    .venv/bin/python benchmarks/input_pipeline.py --smoke      # tiny (checks the script)

Last lines, one per workload and prefetch depth:
    <workload> prefetch=<d> trainer_img_s=<a> step_img_s=<b> ratio=<a/b>

``--imagenet``: ImageNet-style training batches (variable-size JPEGs, 224 px
random-resized crop + flip + normalize) from pemn_jax's image-folder pipeline
vs a PyTorch DataLoader doing the same, with 1 and 2 worker processes
(``benchmarks/imagenet_pipeline.py``; needs ``pip install torch==2.13.0``):

    .venv/bin/python benchmarks/input_pipeline.py --imagenet
    .venv/bin/python benchmarks/input_pipeline.py --imagenet --smoke

Last lines (pemn_jax_img_s: the uint8 batches its trainer consumes, normalized
on the device; host_normalized: normalized on the host too):
    imagenet_pipeline workers=<w> pemn_jax_img_s=<a> torch_img_s=<b> ratio=<a/b>
        host_normalized_img_s=<c> host_normalized_ratio=<c/b>   (on the same line)
    imagenet_pipeline scaling pemn_jax_2_over_1=<x> torch_2_over_1=<y>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from pemn_jax.kernels import cpu_tuning

cpu_tuning.configure()  # before JAX's CPU backend starts (the trainer's main does the same)

import jax  # noqa: E402

from pemn_jax.config import base_config  # noqa: E402
from pemn_jax.train.loop import train_and_evaluate  # noqa: E402
from pemn_jax.train.run import Run  # noqa: E402
from pemn_jax.train.step import make_train_step  # noqa: E402


def _quickstart(c):
  """configs/quickstart.py: PEMN RP 1e-3 + 50% masks, MLP 784-300-100-10."""
  c.dataset, c.model = 'fashion_mnist', 'mlp'
  c.model_kwargs.hidden = (300, 100)
  c.param = {'name': 'masked', 'keep': 0.5,
             'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3, 'rescale': True}}


def _lenet5_cifar10(c):
  """LeNet-5 dense on CIFAR-10 with random crops and flips (augment 'cifar')."""
  c.dataset, c.model, c.augment = 'cifar10', 'lenet5', 'cifar'


WORKLOADS = {'quickstart_mlp': _quickstart, 'lenet5_cifar10': _lenet5_cifar10}


def config_for(name: str, steps: int, log_every: int, prefetch: int, smoke: bool):
  c = base_config()
  WORKLOADS[name](c)
  c.batch_size = 128
  c.num_steps, c.log_every, c.prefetch = steps, log_every, prefetch
  c.eval_every, c.checkpoint_every, c.verify_checkpoints = 0, steps, False
  c.test_limit = 1000
  if smoke:
    c.train_limit = 1024
  return c


def step_alone(config, steps: int) -> float:
  """Images/s of the jitted train step on one device-resident batch."""
  run = Run.build(config)
  ts = jax.jit(lambda k: run.init_state(k, config.seed))(jax.random.key(config.seed))
  step = jax.jit(make_train_step(run.model, run.param, run.tx, run.layout.materialize),
                 donate_argnums=0)
  images, labels = jax.device_put(run.pipe.batch(0))
  key = jax.random.key(0)
  for _ in range(3):
    ts, _ = step(ts, images, labels, key)
  jax.block_until_ready(ts)
  t = time.perf_counter()
  for _ in range(steps):
    ts, _ = step(ts, images, labels, key)
  jax.block_until_ready(ts)
  return steps * config.batch_size / (time.perf_counter() - t)


def trainer(config, tmp: str) -> float:
  """Median images/s of the trainer's logging intervals after the first."""
  wd = tempfile.mkdtemp(dir=tmp)
  train_and_evaluate(config, wd)
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    recs = [json.loads(line) for line in f]
  rates = [r['images_per_s'] for r in recs if 'images_per_s' in r]
  return statistics.median(rates[1:])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workloads', default=','.join(WORKLOADS))
  ap.add_argument('--steps', type=int, default=500, help='timed steps per measurement')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--smoke', action='store_true', help='a few steps (checks the script)')
  ap.add_argument('--imagenet', action='store_true',
                  help='ImageNet-style folder pipeline vs a PyTorch DataLoader')
  ap.add_argument('--images', type=int, default=768, help='--imagenet: training images')
  ap.add_argument('--batch', type=int, default=32, help='--imagenet: batch size')
  args = ap.parse_args()
  if args.imagenet:
    return imagenet(args)
  names = args.workloads.split(',')
  for n in names:
    if n not in WORKLOADS:
      ap.error(f'unknown workload {n!r}; known: {sorted(WORKLOADS)}')
  steps, repeats = (8, 1) if args.smoke else (args.steps, args.repeats)
  log_every = max(1, steps // 5)
  depths = (0, 2)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      res = {'step': [], **{d: [] for d in depths}}
      for r in range(repeats):
        res['step'].append(step_alone(config_for(name, steps, log_every, 0, args.smoke), steps))
        for d in depths:
          # the first logging interval holds the compilation: run one more
          c = config_for(name, steps + log_every, log_every, d, args.smoke)
          res[d].append(trainer(c, tmp))
        print(f'# {name} round {r}: step alone {res["step"][-1]:.0f} img/s, trainer '
              + ', '.join(f'prefetch={d} {res[d][-1]:.0f}' for d in depths), flush=True)
      out[name] = res
  print('\n| workload | step alone (img/s) | '
        + ' | '.join(f'trainer prefetch={d} (img/s) | ratio' for d in depths) + ' |')
  print('| --- | --- |' + ' --- | --- |' * len(depths))
  for name, res in out.items():
    s = statistics.median(res['step'])
    cells = ' | '.join(f'{statistics.median(res[d]):.0f} | {statistics.median(res[d]) / s:.2f}'
                       for d in depths)
    print(f'| {name} | {s:.0f} | {cells} |')
  print()
  for name, res in out.items():
    s = statistics.median(res['step'])
    for d in depths:
      a = statistics.median(res[d])
      print(f'{name} prefetch={d} trainer_img_s={a:.0f} step_img_s={s:.0f} ratio={a / s:.3f}')


def imagenet(args):
  import imagenet_pipeline as ip
  try:
    import torch  # noqa: F401
    has_torch = True
  except ImportError:
    has_torch = False
  if not has_torch and not args.smoke:
    raise SystemExit('--imagenet needs PyTorch (CPU build): pip install torch==2.13.0')
  if not has_torch:
    print('PyTorch is not installed: the smoke run checks the pemn_jax side only')
  images, batch, steps, repeats = ((64, 8, 4, 1) if args.smoke else
                                   (args.images, args.batch, args.steps, args.repeats))
  steps = min(steps, images // batch - 2)
  rates = {(side, w): [] for side in ('pemn_jax', 'pemn_jax_host', 'torch') for w in (1, 2)}
  torch_rate = ip.torch_rate if has_torch else (lambda *a: float('nan'))
  with tempfile.TemporaryDirectory() as tmp:
    folder = ip.make_folder(os.path.join(tmp, 'imgs'), images)
    data_dir = os.path.join(tmp, 'prepared')
    ip.pemn_jax_rate(folder, data_dir, 0, batch, 1)  # prepares the array_record copy
    print(f'# {images} JPEGs of 200-500 px sides, batch {batch}, {steps} timed batches, '
          f'{repeats} rounds (pemn_jax and torch alternated)', flush=True)
    for r in range(repeats):
      for w in (1, 2):
        rates['pemn_jax', w].append(ip.pemn_jax_rate(folder, data_dir, w, batch, steps))
        rates['torch', w].append(torch_rate(folder, w, batch, steps))
        rates['pemn_jax_host', w].append(ip.pemn_jax_rate(folder, data_dir, w, batch, steps,
                                                          normalize=True))
        print(f'# round {r} workers={w}: pemn_jax {rates["pemn_jax", w][-1]:.1f} img/s (host-'
              f'normalized {rates["pemn_jax_host", w][-1]:.1f}), torch '
              f'{rates["torch", w][-1]:.1f} img/s', flush=True)
  med = {k: statistics.median(v) for k, v in rates.items()}
  for w in (1, 2):
    print(f'imagenet_pipeline workers={w} pemn_jax_img_s={med["pemn_jax", w]:.1f} '
          f'torch_img_s={med["torch", w]:.1f} ratio={med["pemn_jax", w] / med["torch", w]:.3f} '
          f'host_normalized_img_s={med["pemn_jax_host", w]:.1f} '
          f'host_normalized_ratio={med["pemn_jax_host", w] / med["torch", w]:.3f}')
  print(f'imagenet_pipeline scaling pemn_jax_2_over_1={med["pemn_jax", 2] / med["pemn_jax", 1]:.3f}'
        f' torch_2_over_1={med["torch", 2] / med["torch", 1]:.3f}')


if __name__ == '__main__':
  main()
