"""Step-time and persistent-memory overhead of each parameterization vs dense.

For each model, builds a jitted train step (materialize -> forward -> backward
-> optax AdamW update, state donated) for every method, compiles them all, then
times them *interleaved* (one step of each method per round) and reports the
median step time of each as a ratio to dense, and each method's persistent
state in bytes: trained state + optimizer state + constants (batch-norm
statistics, seed). Nothing of size N is kept between steps by the non-dense
methods: materialized params are temporaries of the step.

    python benchmarks/overhead.py                      # ResNet-20, ConvMixer-256/8
    python benchmarks/overhead.py --models resnet20 --steps 20
    python benchmarks/overhead.py --smoke              # one tiny step each (checks the script)

Last lines, one per model and method:
    <model>/<method> step_ratio=<x> state_bytes=<n>
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pemn_jax import models
from pemn_jax import params as param_lib
from pemn_jax.train import create_train_state, make_train_step

METHODS = {
    'dense': {'name': 'dense'},
    'rpg': {'name': 'ring', 'dof': 0.01},
    'edge_popup': {'name': 'masked', 'keep': 0.5,
                   'source': {'name': 'prototype', 'mode': 'dense', 'rest': 'fixed'}},
    'pemn_rp': {'name': 'masked', 'keep': 0.5,
                'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3}},
}


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--models', default='resnet20,convmixer_256_8')
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--steps', type=int, default=10, help='timed steps per method (>= 10)')
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--smoke', action='store_true', help='LeNet-5, batch 8, one step')
  args = ap.parse_args()
  if args.smoke:
    args.models, args.batch, args.steps, args.warmup = 'lenet5', 8, 1, 1
  methods = args.methods.split(',')
  if 'dense' not in methods:
    methods.insert(0, 'dense')
  shape = (32, 32, 3)
  print(f'jax {jax.__version__} backend={jax.default_backend()} devices={jax.device_count()} '
        f'batch={args.batch} steps={args.steps}')
  final = []
  for name in args.models.split(','):
    model = models.get(name)
    target = models.abstract_params(model, shape)
    images = jax.random.normal(jax.random.key(1), (args.batch, *shape))
    labels = jnp.arange(args.batch) % 10
    runs = {}
    for m in methods:
      param = param_lib.build(METHODS[m], target)
      tx = optax.adamw(1e-3, weight_decay=5e-4)
      ts = create_train_state(param, tx, jax.random.key(0), models.init_model_state(model, shape))
      step = jax.jit(make_train_step(model, param, tx), donate_argnums=0)
      t0 = time.perf_counter()
      compiled = step.lower(ts, images, labels, jax.random.key(2)).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      temp = getattr(mem, 'temp_size_in_bytes', -1) if mem is not None else -1
      runs[m] = dict(step=compiled, ts=ts, times=[], state_bytes=tree_bytes(ts),
                     compile_s=compile_s,
                     temp_bytes=temp, n=param.num_params, trainable=param.num_trainable())
    for r in range(args.warmup + args.steps):
      for m in methods:  # interleaved: one step of each method per round
        run = runs[m]
        t0 = time.perf_counter()
        run['ts'], metrics = run['step'](run['ts'], images, labels, jax.random.key(r))
        jax.block_until_ready((run['ts'], metrics))
        if r >= args.warmup:
          run['times'].append(time.perf_counter() - t0)
    base = statistics.median(runs['dense']['times'])
    dense_bytes = runs['dense']['state_bytes']
    for m in methods:
      run = runs[m]
      med = statistics.median(run['times'])
      q = np.percentile(run['times'], [25, 75])
      print(f'{name:16s} {m:11s} N={run["n"]} trainable={run["trainable"]} '
            f'median_step_s={med:.4f} iqr=[{q[0]:.4f},{q[1]:.4f}] compile_s={run["compile_s"]:.1f} '
            f'state_bytes={run["state_bytes"]} ({100 * run["state_bytes"] / dense_bytes:.2f}% '
            f'of dense) step_temp_bytes={run["temp_bytes"]}')
      final.append(f'{name}/{m} step_ratio={med / base:.3f} state_bytes={run["state_bytes"]}')
  print('\n'.join(final))


if __name__ == '__main__':
  main()
