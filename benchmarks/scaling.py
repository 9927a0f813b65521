"""Per-device memory of the train step as devices grow, and multi-process step time.

Memory (no accelerator needed): for each method and device count, the
trainer's jitted train step (``Layout.materialize`` -> forward -> backward ->
optimizer update, state donated) is lowered for a mesh over the first n of
``JAX_NUM_CPU_DEVICES`` CPU devices and compiled; XLA's
``memory_analysis()`` of the compiled executable gives, per device,

* ``persistent``: the train state's bytes on one device (what lives between
  steps: trained state, optimizer state, batch statistics);
* ``peak``: arguments + outputs - aliased (donated) + temporaries.

Layouts:

* ``replicated``: the whole state on every device; every device generates
  every weight (``config.sharding.generate='replicated'``: the layout before
  scale-out).
* ``replicated_state_sharded_gen`` (only with ``--layouts``): data parallel,
  the state on every device, but generation per device
  (``sharding.generate='sharded'``): what per-device generation alone saves.
* ``fsdp_replicated_gen`` (only with ``--layouts``): FSDP state, every weight
  generated on every device.
* ``fsdp``: ``mesh.fsdp=n``, ``sharding.state='fsdp'``, ``sharding.params=
  'fsdp'``, ``sharding.generate='sharded'``: the state split over devices
  and every generated weight computed in per-device slices.

Step time (``--processes``): the same small training run (LeNet-5 RPG, MNIST
shaped random data) with 1 process x 2 CPU devices and 2 processes x 1 device
(gloo), via ``launch/local.sh``.

    JAX_NUM_CPU_DEVICES=8 python benchmarks/scaling.py
    JAX_NUM_CPU_DEVICES=8 python benchmarks/scaling.py --methods rpg --devices 1,8 --process_steps 9
    JAX_NUM_CPU_DEVICES=8 python benchmarks/scaling.py --per_device_batch 8 --process_steps 0
    python benchmarks/scaling.py --layouts replicated_state_sharded_gen,fsdp_replicated_gen
    JAX_NUM_CPU_DEVICES=8 python benchmarks/scaling.py --smoke   # LeNet-5, 1-2 devices, dense

Last lines, one per method, device count and layout:
    <method> devices=<n> sharding=<replicated|fsdp> peak_bytes_per_device=<b>
"""

from __future__ import annotations

import os

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from pemn_jax import models  # noqa: E402
from pemn_jax import params as param_lib  # noqa: E402
from pemn_jax.train.optim import make_optimizer  # noqa: E402
from pemn_jax.train.sharding import Layout, bytes_per_device, make_mesh  # noqa: E402
from pemn_jax.train.step import create_train_state, make_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {
    'dense': {'name': 'dense'},
    'rpg': {'name': 'ring', 'dof': 0.01, 'select': '@stages'},
    'pemn': {'name': 'masked', 'keep': 0.5,
             'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3}},
}
LAYOUTS = {
    'replicated': dict(mesh={'data': -1, 'fsdp': 1}, state='replicated', params='replicated',
                       generate='replicated'),
    'fsdp': dict(mesh={'data': 1, 'fsdp': -1}, state='fsdp', params='fsdp', generate='sharded'),
    # Data parallel, replicated state, but per-device generation: what generation alone saves.
    'replicated_state_sharded_gen': dict(mesh={'data': -1, 'fsdp': 1}, state='replicated',
                                         params='replicated', generate='sharded'),
    # FSDP state, but every weight generated on every device: what generation adds to FSDP.
    'fsdp_replicated_gen': dict(mesh={'data': 1, 'fsdp': -1}, state='fsdp', params='fsdp',
                                generate='replicated'),
}
DEFAULT_LAYOUTS = 'replicated,fsdp'


def compiled_memory(model, spec, layout_name, n, batch, image_shape):
  """(persistent, peak, N): bytes per device of the compiled train step."""
  target = models.abstract_params(model, image_shape)
  param = param_lib.build(spec, target, model=model, total_steps=1000)
  opt = {'name': 'adamw', 'lr': 1e-3, 'weight_decay': 0.0, 'momentum': 0.9, 'nesterov': False,
         'schedule': 'cosine', 'warmup_steps': 0, 'grad_clip': 0.0, 'decay_epochs': 0.0}
  tx, _ = make_optimizer(ml_collections.ConfigDict(opt), 1000, 100)
  lay = LAYOUTS[layout_name]
  layout = Layout(make_mesh(lay['mesh'], jax.devices()[:n]), lay['state'], lay['params'],
                  lay['generate'])

  def init(k):
    return create_train_state(param, tx, k, models.init_model_state(model, image_shape), 0)

  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = layout.state_shardings(abstract)
  args = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, shardings),
          jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32, sharding=layout.batch),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=layout.batch),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=layout.replicated))
  step = jax.jit(make_train_step(model, param, tx, layout.materialize),
                 in_shardings=(shardings, layout.batch, layout.batch, layout.replicated),
                 out_shardings=(shardings, layout.replicated), donate_argnums=0)
  m = step.lower(*args).compile().memory_analysis()
  persistent = bytes_per_device(abstract, shardings)
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes \
      + m.temp_size_in_bytes
  return persistent, peak, param.num_params


def process_timing(steps: int, batch: int):
  """Seconds per step of the same run at 1 process x 2 devices and 2 x 1."""
  out = {}
  for procs, devs in ((1, 2), (2, 1)):
    with tempfile.TemporaryDirectory() as wd:
      cfg = (f'{ROOT}/configs/rpg.py:model=lenet5,dataset=mnist')
      flags = [f'--config={cfg}', f'--workdir={wd}', f'--config.num_steps={steps}',
               f'--config.batch_size={batch}', '--config.train_limit=4096',
               '--config.test_limit=1000', f'--config.log_every={steps}',
               f'--config.checkpoint_every={steps}']
      env = {**os.environ, 'DEVICES': str(devs), 'PYTHON': sys.executable}
      t0 = time.time()
      r = subprocess.run(['bash', f'{ROOT}/launch/local.sh', str(procs), *flags], env=env,
                         capture_output=True, text=True, timeout=1800)
      if r.returncode:
        raise RuntimeError(f'{procs} processes failed: {r.stderr[-2000:]}')
      rec = [json.loads(ln) for ln in open(os.path.join(wd, 'metrics.jsonl'))
             if '"images_per_s"' in ln]
      out[procs] = {'wall_s': time.time() - t0, 'images_per_s': rec[-1]['images_per_s']}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', default='resnet18')
  ap.add_argument('--dataset_shape', default='32,32,3', help='input H,W,C')
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--devices', default='1,2,4,8')
  ap.add_argument('--layouts', default=DEFAULT_LAYOUTS, help=f'of {",".join(LAYOUTS)}')
  ap.add_argument('--batch', type=int, default=128, help='global batch')
  ap.add_argument('--per_device_batch', type=int, default=0,
                  help='instead of --batch: this many examples per device (the global batch '
                       'grows with the devices; isolates what parameters cost)')
  ap.add_argument('--process_steps', type=int, default=None,
                  help='steps of the 1 vs 2 process timing (0: skip; default 200; --smoke: 0,\n'
                       'or 2 if given)')
  ap.add_argument('--smoke', action='store_true',
                  help='LeNet-5, 1-2 devices, the first of --methods (checks the script)')
  args = ap.parse_args()
  if args.smoke:
    args.model, args.dataset_shape, args.devices, args.batch = 'lenet5', '28,28,1', '1,2', 8
    args.methods = args.methods.split(',')[0]
  if args.process_steps is None:
    args.process_steps = 0 if args.smoke else 200
  elif args.smoke:
    args.process_steps = min(args.process_steps, 2)
  shape = tuple(int(x) for x in args.dataset_shape.split(','))
  counts = [int(x) for x in args.devices.split(',')]
  if max(counts) > jax.device_count():
    sys.exit(f'--devices {args.devices} needs JAX_NUM_CPU_DEVICES >= {max(counts)}')
  model = models.get(args.model, num_classes=10)
  what = (f'{args.per_device_batch} examples per device' if args.per_device_batch
          else f'global batch {args.batch}')
  print(f'# {args.model} input {shape}, {what}; XLA memory_analysis of the compiled train step '
        f'(AdamW), bytes per device', flush=True)
  results = []
  layouts = args.layouts.split(',')
  if not set(layouts) <= set(LAYOUTS):
    sys.exit(f'--layouts: unknown {sorted(set(layouts) - set(LAYOUTS))}; known: {list(LAYOUTS)}')
  for method in args.methods.split(','):
    for layout in layouts:
      for n in counts:
        t0 = time.time()
        batch = args.per_device_batch * n if args.per_device_batch else args.batch
        persistent, peak, num = compiled_memory(model, METHODS[method], layout, n, batch, shape)
        results.append((method, n, layout, persistent, peak))
        print(f'{method} N={num} devices={n} sharding={layout} persistent={persistent} '
              f'peak={peak} compile_s={time.time() - t0:.1f}', flush=True)
  for method in args.methods.split(','):
    for layout in layouts:
      base = [r for r in results if r[0] == method and r[2] == layout and r[1] == counts[0]][0]
      ratios = ' '.join(f'{r[1]}:{r[4] / base[4]:.3f}' for r in results
                        if r[0] == method and r[2] == layout)
      print(f'# {method} {layout}: peak vs {counts[0]} device(s) {ratios}')
  if args.process_steps:
    t = process_timing(args.process_steps, 64 if not args.smoke else 8)
    print(f'# step time, LeNet-5 RPG, {args.process_steps} steps: 1 process x 2 devices '
          f'{t[1]["images_per_s"]:.0f} img/s, 2 processes x 1 device '
          f'{t[2]["images_per_s"]:.0f} img/s; ratio (2 proc / 1 proc) '
          f'{t[2]["images_per_s"] / t[1]["images_per_s"]:.3f}', flush=True)
  for method, n, layout, _, peak in results:
    print(f'{method} devices={n} sharding={layout} peak_bytes_per_device={peak}')


if __name__ == '__main__':
  main()
