"""Each method vs dense on whatever backend runs this (CPU here; GPU/TPU where
you run it): step time, peak memory and cost of the compiled train step, and
the op census of the same step lowered for TPU.

    python benchmarks/accelerator.py                # the sizes for this backend
    python benchmarks/accelerator.py --smoke        # tiny: checks the script
    python benchmarks/accelerator.py --dtype bfloat16 --batch 256   # on an accelerator

Models: ResNet-18 at 224 px (ImageNet shape; batch 256 per device on an
accelerator, 4 at 64 px on CPU), ResNet-20 on CIFAR (32 px) and the ViT.
Per method: the median step time of the jitted train step (materialize ->
forward -> backward -> SGD update, state donated, interleaved with dense's),
peak memory (XLA ``memory_analysis``: arguments + outputs + temporaries),
FLOPs and bytes accessed (XLA ``cost_analysis``), and the StableHLO a TPU
would compile (``pemn_jax.lowering``): its scatters, sorts and gathers, the
largest of each. Also RPG's step against its formulation before 2026-12 (the
ring gradient as XLA's transpose of the gather, a scatter-add of T updates),
timed in the same run on ResNet-20: on CPU both run a scatter-add (the
platform-dependent choice), on TPU/GPU the new one gathers by the inverse
permutation.

Last lines, one per model and method:
    <model> <method> step_ratio=<a> bytes_ratio=<b> scatters=<n> sorts=<m>
(ratios against dense; bytes = XLA's bytes accessed; scatters/sorts: counts in
the TPU program, none of them N-sized -- ``lowering.problems`` is printed if
one is).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pemn_jax import lowering, models
from pemn_jax import params as param_lib
from pemn_jax.params.ring import Ring
from pemn_jax.train import create_train_state, make_train_step

METHODS = {
    'dense': {'name': 'dense'},
    'rpg': {'name': 'ring', 'dof': 0.01, 'select': '@stages'},
    'pemn_rp': {'name': 'masked', 'keep': 0.5,
                'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3}},
    'edge_popup': {'name': 'masked', 'keep': 0.5,
                   'source': {'name': 'prototype', 'mode': 'signed_constant', 'rest': 'fixed'}},
    'supermask': {'name': 'masked', 'kind': 'supermask',
                  'source': {'name': 'prototype', 'mode': 'signed_constant', 'rest': 'fixed'}},
}


class ScatterRing(Ring):
  """RPG as before 2026-12: the ring gradient is XLA's transpose of the
  gather (a scatter-add of T updates into D slots). The baseline."""

  def generate(self, state, seed):
    pos, sign, ids = self.flat_indices(seed)
    flat = jnp.take(state['ring'], pos, axis=0) * self._coefficients(sign, ids)
    shapes = [self.leaves[p].shape for p in self.generated]
    return dict(zip(self.generated, self.segments.split(flat, shapes), strict=True))


def sizes(accelerator: bool, smoke: bool, batch: int | None):
  """(model, input shape, batch) of each workload."""
  if smoke:
    return [('resnet20', (32, 32, 3), 4)]
  b = batch or (256 if accelerator else None)
  return [('resnet18', (224, 224, 3) if accelerator else (64, 64, 3), b or 4),
          ('resnet20', (32, 32, 3), b or 32), ('vit', (32, 32, 3), b or 32)]


def build(model, shape, batch, param, dtype):
  """The jitted train step, its initial state and a batch."""
  tx = optax.sgd(0.1, momentum=0.9)
  ms = models.init_model_state(model, shape)
  ts = create_train_state(param, tx, jax.random.key(0), ms, 0)
  step = jax.jit(make_train_step(model, param, tx, dtype=dtype), donate_argnums=0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  return step, ts, (images, labels, jax.random.key(1))


def profile(step, ts, batch_args) -> dict:
  """Compiled cost, memory and the TPU program's census."""
  compiled = step.lower(ts, *batch_args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (ts, *batch_args))
  counts = lowering.census(lowering.lower(step, abstract, ('tpu',)))
  return {'flops': float(cost.get('flops', 0)), 'bytes': float(cost.get('bytes accessed', 0)),
          'peak': (mem.argument_size_in_bytes + mem.output_size_in_bytes
                   + mem.temp_size_in_bytes) if mem is not None else 0,
          'census': counts}


def time_steps(runs: dict, steps: int, warmup: int) -> dict[str, float]:
  """Median step time of each (step, ts, batch), interleaved round by round."""
  times = {k: [] for k in runs}
  states = {k: r[1] for k, r in runs.items()}
  for i in range(warmup + steps):
    for k, (step, _, batch) in runs.items():
      t0 = time.perf_counter()
      states[k], m = step(states[k], *batch)
      jax.block_until_ready(m)
      if i >= warmup:
        times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--batch', type=int, default=None, help='per device (default: by backend)')
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--dtype', default=None, help='compute dtype (e.g. bfloat16)')
  ap.add_argument('--models', default=None, help='a comma-separated subset (default: all)')
  ap.add_argument('--smoke', action='store_true', help='ResNet-20, batch 4, 2 steps')
  args = ap.parse_args()
  methods = ['dense'] + [m for m in args.methods.split(',') if m != 'dense']
  steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
  backend = jax.default_backend()
  print(f'# backend {backend}: {jax.devices()[0].device_kind}, jax {jax.__version__}, '
        f'dtype {args.dtype or "float32"}', flush=True)
  lines = []
  for name, shape, batch in sizes(backend != 'cpu', args.smoke, args.batch):
    if args.models and name not in args.models.split(','):
      continue
    model = models.get(name)
    target = models.abstract_params(model, shape)
    runs, prof, params = {}, {}, {}
    for m in methods:
      params[m] = param_lib.build(METHODS[m], target, model=model)
    if 'rpg' in methods and name == 'resnet20':  # the ring gradient before and after
      params['rpg_scatter'] = ScatterRing(
          target, **{k: v for k, v in METHODS['rpg'].items() if k != 'name'})
    for m, param in params.items():
      runs[m] = build(model, shape, batch, param, args.dtype)
      prof[m] = profile(*runs[m])
    t = time_steps(runs, steps, warmup)
    print(f'\n## {name} {shape} batch {batch}\n')
    print('| method | step s | ratio | peak MiB | ratio | GFLOP | bytes accessed MiB | ratio | '
          'TPU scatters (largest) | sorts | gathers (largest) |')
    print('|' + ' --- |' * 11)
    for m in runs:
      p, d = prof[m], prof['dense']
      c = p['census']
      print(f'| {m} | {t[m]:.4f} | {t[m] / t["dense"]:.2f} | {p["peak"] / 2**20:.1f} | '
            f'{p["peak"] / max(1, d["peak"]):.2f} | {p["flops"] / 1e9:.2f} | '
            f'{p["bytes"] / 2**20:.1f} | {p["bytes"] / max(1, d["bytes"]):.2f} | '
            f'{len(c["scatters"])} ({max(c["scatters"], default=0)}) | {len(c["sorts"])} | '
            f'{len(c["gathers"])} ({max(c["gathers"], default=0)}) |', flush=True)
      found = lowering.problems(c, getattr(params[m], 'dof', 0))
      if found:
        print(f'# {name} {m}: {found[:3]}')
    if 'rpg_scatter' in runs:
      print(f'\nring_gradient {name} rpg_s={t["rpg"]:.4f} before_s={t["rpg_scatter"]:.4f} '
            f'ratio={t["rpg"] / t["rpg_scatter"]:.3f} (largest TPU scatter '
            f'{max(prof["rpg"]["census"]["scatters"], default=0)} vs '
            f'{max(prof["rpg_scatter"]["census"]["scatters"], default=0)} updates before)')
    for m in methods:
      c = prof[m]['census']
      lines.append(f'{name} {m} step_ratio={t[m] / t["dense"]:.3f} '
                   f'bytes_ratio={prof[m]["bytes"] / max(1, prof["dense"]["bytes"]):.3f} '
                   f'scatters={len(c["scatters"])} sorts={len(c["sorts"])}')
  print()
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
