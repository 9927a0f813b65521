"""Train-step time on CPU: pemn_jax vs the same workload written in PyTorch.

Workloads (batch 128 of 32x32x3, random data, one optimizer step each):

* ``resnet20_dense_sgd``: the CIFAR ResNet-20 (3x3 convs 16/32/64, 1x1
  projection shortcuts with BN), SGD momentum 0.9, weight decay 1e-4.
* ``convmixer_256_8_pemn_rp``: ConvMixer-256/8 (patch 2, kernel 5) with PEMN
  RP 1e-3 weights and edge-popup top-k masks keeping 50% per layer, AdamW;
  the PyTorch side is written as the PEMN authors' code works: the frozen
  weights are built once (a prototype of ratio x N values repeated and
  randomly permuted per layer), each forward sorts the scores of every layer
  to a 0/1 mask (straight-through), biases and BN affine params train.

As a user meets them (the default): each side in its own process with its
own defaults, a fresh process per side and round, the sides alternated and
their order rotated every round. pemn_jax runs as its trainer does
(``pemn_jax.kernels.cpu_tuning``, configured from the workload's activations
as ``python -m pemn_jax.main`` configures it from its config's, and, where
``pip install -e '.[cpu]'``
installed them, oneDNN's convolutions through XLA's FFI: see
``pemn_jax.kernels.dnnl_conv``); PyTorch (CPU build, ``pip install
torch==2.13.0``; needed by this benchmark only, never by the library) runs
untouched, once in NCHW and once in channels_last memory format, and the
faster of the two is PyTorch's figure (the line says which). Each process
times ``--steps`` steps after ``--warmup``; a side's figure is the median of
its ``--rounds`` per-process medians.

``--in_process`` times instead both frameworks in this one process,
interleaved one step each per round, pemn_jax three ways: by default, with
its XLA-based kernel gradient (``PEMN_JAX_CONV=cpu``) and with XLA's own
convolution gradients (``PEMN_JAX_CONV=xla``). There PyTorch shares what
pemn_jax sets for its process (``OMP_WAIT_POLICY=PASSIVE``, XLA's thread
pools beside its own) and runs slower than alone.

    .venv/bin/python benchmarks/vs_pytorch.py
    .venv/bin/python benchmarks/vs_pytorch.py --workloads resnet20_dense_sgd --rounds 8 --steps 20
    .venv/bin/python benchmarks/vs_pytorch.py --in_process   # both in one process
    .venv/bin/python benchmarks/vs_pytorch.py --layers       # + per conv layer (one process)
    .venv/bin/python benchmarks/vs_pytorch.py --smoke        # tiny (checks the script)

Last lines, one per workload:
    <workload> pemn_jax_s=<a> torch_s=<b> ratio=<a/b>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# A PyTorch side's own process (``--child=torch...``) imports nothing of JAX or
# pemn_jax: it runs as a PyTorch user's process does.
TORCH_CHILD = any(a.startswith('--child=torch') for a in sys.argv)
BASE_ENV = dict(os.environ)  # as the user started this process: what each side's process gets
CPU_TUNING = {}
if not TORCH_CHILD:
  import jax
  import jax.numpy as jnp
  import optax

  from pemn_jax import models
  from pemn_jax import params as param_lib
  from pemn_jax.config import base_config
  from pemn_jax.kernels import conv as fast_conv
  from pemn_jax.kernels import cpu_tuning, dnnl_conv
  from pemn_jax.train import create_train_state, make_train_step
  from pemn_jax.train.run import activation_bytes

try:
  import torch
  from torch import nn as tnn
  from torch.nn import functional as F
except ImportError:  # pragma: no cover - reported by main()
  torch = None


# ----------------------------------------------------------------- PyTorch side
def torch_resnet20(width=16, blocks=3, num_classes=10):
  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c0 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.b0 = tnn.BatchNorm2d(cout)
      self.c1 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.b1 = tnn.BatchNorm2d(cout)
      self.short = None
      if stride != 1 or cin != cout:
        self.short = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                    tnn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.b1(self.c1(F.relu(self.b0(self.c0(x)))))
      return F.relu(y + (x if self.short is None else self.short(x)))

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.stem = tnn.Sequential(tnn.Conv2d(3, width, 3, 1, 1, bias=False),
                                 tnn.BatchNorm2d(width), tnn.ReLU())
      layers, cin = [], width
      for i, w in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks):
          layers.append(Block(cin, w, 2 if (i > 0 and b == 0) else 1))
          cin = w
      self.layers = tnn.Sequential(*layers)
      self.fc = tnn.Linear(cin, num_classes)

    def forward(self, x):
      return self.fc(self.layers(self.stem(x)).mean((2, 3)))

  return Net()


class _TopK(torch.autograd.Function if torch else object):
  """edge-popup's GetSubnet: 1 for the top k fraction of scores, straight-through."""

  @staticmethod
  def forward(ctx, scores, k):
    out = scores.clone()
    _, idx = scores.flatten().sort()
    j = int((1 - k) * scores.numel())
    flat = out.flatten()
    flat[idx[:j]] = 0
    flat[idx[j:]] = 1
    return flat.view_as(scores)

  @staticmethod
  def backward(ctx, g):
    return g, None


def _prototype_weights(shape, ratio, gen, std):
  """RP: ratio x numel random values, repeated and randomly permuted."""
  n = int(np.prod(shape))
  m = max(1, int(round(ratio * n)))
  proto = torch.randn(m, generator=gen) * std
  rep = proto.repeat(-(-n // m))[:n]
  return rep[torch.randperm(n, generator=gen)].view(shape)


def _freeze_and_score(layer, ratio, keep, gen):
  """Replaces ``layer.weight`` by frozen RP prototype weights (He fan-in std)
  and adds edge-popup scores (kaiming-uniform, as the reference)."""
  fan_in = layer.weight[0].numel()
  w = _prototype_weights(layer.weight.shape, ratio, gen, (2.0 / fan_in) ** 0.5)
  del layer.weight
  layer.register_buffer('weight', w)
  layer.scores = tnn.Parameter(torch.empty_like(w))
  tnn.init.kaiming_uniform_(layer.scores, a=5 ** 0.5)
  layer.keep = keep


class MaskedConv(tnn.Conv2d if torch else object):
  def __init__(self, *a, ratio=1e-3, keep=0.5, gen=None, **k):
    super().__init__(*a, **k)
    _freeze_and_score(self, ratio, keep, gen)

  def forward(self, x):
    w = self.weight * _TopK.apply(self.scores, self.keep)
    return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaskedLinear(tnn.Linear if torch else object):
  def __init__(self, *a, ratio=1e-3, keep=0.5, gen=None, **k):
    super().__init__(*a, **k)
    _freeze_and_score(self, ratio, keep, gen)

  def forward(self, x):
    return F.linear(x, self.weight * _TopK.apply(self.scores, self.keep), self.bias)


def torch_masked_convmixer(dim=256, depth=8, kernel=5, patch=2, num_classes=10, ratio=1e-3,
                           keep=0.5):
  gen = torch.Generator().manual_seed(0)
  kw = dict(ratio=ratio, keep=keep, gen=gen)

  class Residual(tnn.Module):
    def __init__(self, fn):
      super().__init__()
      self.fn = fn

    def forward(self, x):
      return self.fn(x) + x

  return tnn.Sequential(
      MaskedConv(3, dim, patch, stride=patch, **kw), tnn.GELU(), tnn.BatchNorm2d(dim),
      *[tnn.Sequential(
          Residual(tnn.Sequential(MaskedConv(dim, dim, kernel, groups=dim, padding='same', **kw),
                                  tnn.GELU(), tnn.BatchNorm2d(dim))),
          MaskedConv(dim, dim, 1, **kw), tnn.GELU(), tnn.BatchNorm2d(dim))
        for _ in range(depth)],
      tnn.AdaptiveAvgPool2d((1, 1)), tnn.Flatten(), MaskedLinear(dim, num_classes, **kw))


def torch_step_fn(net, opt, x, y):
  net.train()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return loss
  return step


# -------------------------------------------------------------------- JAX side
WORKLOADS = {
    'resnet20_dense_sgd': dict(
        model='resnet20', param={'name': 'dense'},
        tx=lambda: optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))),
    'convmixer_256_8_pemn_rp': dict(
        model='convmixer_256_8',
        param={'name': 'masked', 'keep': 0.5,
               'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3, 'rest': 'train'}},
        tx=lambda: optax.adamw(1e-3, weight_decay=5e-3)),
}


def jax_step(name, impl, batch, shape, smoke):
  spec = WORKLOADS[name]
  model = models.get('lenet5' if smoke else spec['model'])
  target = models.abstract_params(model, shape)
  param = param_lib.build(spec['param'], target)
  tx = spec['tx']()
  ts = create_train_state(param, tx, jax.random.key(0), models.init_model_state(model, shape))
  images = jax.random.normal(jax.random.key(1), (batch, *shape))
  labels = jnp.arange(batch) % 10
  old, fast_conv.DEFAULT_IMPL = fast_conv.DEFAULT_IMPL, impl
  try:  # the impl is read while tracing
    step = jax.jit(make_train_step(model, param, tx), donate_argnums=0)
    compiled = step.lower(ts, images, labels, jax.random.key(2)).compile()
  finally:
    fast_conv.DEFAULT_IMPL = old
  box = {'ts': ts, 'r': 0}

  def run():
    box['ts'], m = compiled(box['ts'], images, labels, jax.random.key(box['r']))
    box['r'] += 1
    jax.block_until_ready((box['ts'], m))
  return run


def torch_step(name, batch, shape, smoke, channels_last=False):
  torch.manual_seed(0)
  x = torch.randn(batch, shape[2], shape[0], shape[1])
  y = torch.arange(batch) % 10
  if name == 'resnet20_dense_sgd':
    net = torch_resnet20(width=4 if smoke else 16, blocks=1 if smoke else 3)
  else:
    net = (torch_masked_convmixer(dim=16, depth=1) if smoke else torch_masked_convmixer())
  if channels_last:  # NHWC activations and weights: PyTorch's oneDNN path without reorders
    net = net.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  if name == 'resnet20_dense_sgd':
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  else:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=5e-3)
  return torch_step_fn(net, opt, x, y)


def timed(fns: dict, warmup: int, steps: int) -> dict:
  times = {k: [] for k in fns}
  names = list(fns)
  for r in range(warmup + steps):
    # interleaved: one step of each per round, the order rotated every round
    # (what runs right after another framework's step pays for its threads
    # winding down)
    for k in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      fns[k]()
      if r >= warmup:
        times[k].append(time.perf_counter() - t0)
  return times


def stats(ts):
  q = np.percentile(ts, [25, 75])
  return statistics.median(ts), q[0], q[1]


# ------------------------------------------------------------ per-layer table
LAYERS = [  # (name, N, H, Cin, Cout, k, stride): ResNet-20 and ConvMixer-256/8 conv shapes
    ('resnet20 stem 3->16', 128, 32, 3, 16, 3, 1),
    ('resnet20 stage1 16->16', 128, 32, 16, 16, 3, 1),
    ('resnet20 stage2 down 16->32', 128, 32, 16, 32, 3, 2),
    ('resnet20 stage2 32->32', 128, 16, 32, 32, 3, 1),
    ('resnet20 stage3 down 32->64', 128, 16, 32, 64, 3, 2),
    ('resnet20 stage3 64->64', 128, 8, 64, 64, 3, 1),
    ('resnet20 shortcut 1x1 16->32 s2', 128, 32, 16, 32, 1, 2),
    ('convmixer patch 2x2 s2 3->256', 128, 32, 3, 256, 2, 2),
    ('convmixer pointwise 256->256', 128, 16, 256, 256, 1, 1),
]


def layer_table(warmup, steps, smoke):
  dn = ('NHWC', 'HWIO', 'NHWC')
  rows = []
  for name, n, h, cin, cout, k, s in (LAYERS[:2] if smoke else LAYERS):
    n = 4 if smoke else n
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.1, jnp.float32)
    pad = 'SAME' if k > 1 and k % 2 else 'VALID'
    fns = {}
    for impl in ('xla', 'cpu', 'auto'):
      f = jax.jit(jax.grad(lambda x, w, impl=impl, s=s, pad=pad: jnp.sum(
          fast_conv.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=dn,
                                         impl=impl) ** 2), (0, 1)))
      fns[impl] = lambda f=f, x=x, w=w: jax.block_until_ready(f(x, w))
    tx = torch.randn(n, cin, h, h, requires_grad=True)
    tw = torch.randn(cout, cin, k, k, requires_grad=True)
    tpad = 'same' if pad == 'SAME' and s == 1 else (k // 2 if pad == 'SAME' else 0)

    def tstep(tx=tx, tw=tw, s=s, tpad=tpad):
      y = F.conv2d(tx, tw, stride=s, padding=tpad)
      torch.autograd.grad((y ** 2).sum(), (tx, tw))
    fns['torch'] = tstep
    t = timed(fns, warmup, steps)
    med = {k_: statistics.median(v) * 1e3 for k_, v in t.items()}
    rows.append((name, med['xla'], med['cpu'], med['auto'], med['torch']))
    print(f'| {name} | {med["xla"]:.1f} | {med["cpu"]:.1f} | {med["auto"]:.1f} | '
          f'{med["torch"]:.1f} | {med["auto"] / med["torch"]:.2f} |', flush=True)
  return rows


SIDES = ('pemn_jax', 'torch', 'torch_cl')  # torch_cl: PyTorch in channels_last format


def tune(names, batch, smoke):
  """The trainer's CPU set-up (``cpu_tuning.configure``, before JAX's backend
  starts), decided as the trainer decides it: by the activations of a step of
  the largest of the ``names`` workloads."""
  c = base_config()
  c.batch_size, c.dataset = batch, 'fashion_mnist' if smoke else 'cifar10'
  sizes = []
  for name in names:
    c.model = 'lenet5' if smoke else WORKLOADS[name]['model']
    sizes.append(activation_bytes(c) or 0)
  CPU_TUNING.update(cpu_tuning.configure(max(sizes)))


def jax_setup() -> dict:
  """What pemn_jax's process runs with: its CPU tuning and oneDNN's status."""
  return {'cpu_tuning': CPU_TUNING, 'onednn': dnnl_conv.version() if dnnl_conv.available()
          else f'unavailable ({dnnl_conv.unavailable_reason()})'}


def child(side, name, args):
  """One side's process: ``--warmup`` + ``--steps`` steps of ``name``; prints
  one JSON line of the timed steps' seconds."""
  shape = (28, 28, 1) if args.smoke and side == 'pemn_jax' else (32, 32, 3)
  if side == 'pemn_jax':
    tune([name], args.batch, args.smoke)
    fn = jax_step(name, 'auto', args.batch, shape, args.smoke)
    info = jax_setup()
  else:
    fn = torch_step(name, args.batch, shape, args.smoke, channels_last=side == 'torch_cl')
    info = {'threads': torch.get_num_threads(), 'omp_wait_policy':
            os.environ.get('OMP_WAIT_POLICY', '(default)')}
  times = timed({side: fn}, args.warmup, args.steps)[side]
  print(json.dumps({'side': side, 'workload': name, 'times': times, **info}), flush=True)


def separate(name, args, sides) -> dict:
  """Per side, the median of its processes' medians; each process started
  with this process's environment as the user gave it (``BASE_ENV``)."""
  per = {k: [] for k in sides}
  for r in range(args.rounds):
    for side in sides[r % len(sides):] + sides[:r % len(sides)]:
      cmd = [sys.executable, os.path.abspath(__file__), f'--child={side}', '--workloads', name,
             '--batch', str(args.batch), '--steps', str(args.steps), '--warmup',
             str(args.warmup)] + (['--smoke'] if args.smoke else [])
      p = subprocess.run(cmd, env=BASE_ENV, capture_output=True, text=True, check=False)
      if p.returncode:
        raise SystemExit(f'{name} {side} failed (exit {p.returncode}):\n{p.stderr[-3000:]}')
      out = json.loads(p.stdout.strip().splitlines()[-1])
      med = statistics.median(out['times'])
      per[side].append(med)
      extra = {k: v for k, v in out.items() if k not in ('side', 'workload', 'times')}
      print(f'{name} round {r} {side}: median {med:.4f} s {extra}', flush=True)
  return {k: stats(v) for k, v in per.items()}


def in_process(name, args):
  shape = (28, 28, 1) if args.smoke else (32, 32, 3)
  tshape = (32, 32, 3)  # the torch models take CIFAR shapes even in the smoke run
  fns = {'pemn_jax': jax_step(name, 'auto', args.batch, shape, args.smoke),
         'pemn_jax_cpu': jax_step(name, 'cpu', args.batch, shape, args.smoke),
         'pemn_jax_xla': jax_step(name, 'xla', args.batch, shape, args.smoke)}
  if torch is not None:
    fns['torch'] = torch_step(name, args.batch, tshape, args.smoke)
  t = timed(fns, args.warmup, args.steps)
  s = {k: stats(v) for k, v in t.items()}
  for k, (med, lo, hi) in s.items():
    print(f'{name} {k} (in process): median {med:.4f} s, IQR [{lo:.4f}, {hi:.4f}]', flush=True)
  print(f'{name} XLA-gradient / fast-path: {s["pemn_jax_xla"][0] / s["pemn_jax"][0]:.2f}x, '
        f'XLA-based fast path / fast path: {s["pemn_jax_cpu"][0] / s["pemn_jax"][0]:.2f}x')
  return s


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--workloads', default=','.join(WORKLOADS))
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--steps', type=int, default=10, help='timed steps per process (or round)')
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--rounds', type=int, default=4, help='processes per side')
  ap.add_argument('--in_process', action='store_true',
                  help='both frameworks in this process, interleaved step by step')
  ap.add_argument('--threads', type=int, default=0,
                  help='--in_process: torch threads (0: all cores)')
  ap.add_argument('--layers', action='store_true',
                  help='also per conv layer shape, fwd+bwd ms (both in this process)')
  ap.add_argument('--smoke', action='store_true', help='tiny models, batch 8, 1 step, 1 round')
  ap.add_argument('--child', choices=SIDES, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.smoke:
    args.batch, args.steps, args.warmup, args.rounds = 8, 1, 1, 1
  if args.child:
    return child(args.child, args.workloads, args)
  if args.in_process or args.layers:
    tune([n for n in args.workloads.split(',') if n in WORKLOADS], args.batch, args.smoke)
  if torch is None and not args.smoke:
    raise SystemExit('this benchmark needs PyTorch (CPU build): pip install torch==2.13.0')
  for name in args.workloads.split(','):
    if name not in WORKLOADS:
      raise SystemExit(f'unknown workload {name!r}; known: {list(WORKLOADS)}')
  tv = torch.__version__ if torch else 'absent (the smoke run checks the JAX side only)'
  mode = ('one process, interleaved' if args.in_process else
          f'separate processes, {args.rounds} per side')
  print(f'jax {jax.__version__} ({jax.default_backend()}), torch {tv}, batch {args.batch}, '
        f'{args.steps} timed steps after {args.warmup}, {mode}'
        + (f', pemn_jax: {jax_setup()}' if args.in_process or args.layers else ''), flush=True)
  if args.in_process and args.threads and torch is not None:
    torch.set_num_threads(args.threads)
  if args.layers and torch is not None:
    print('| conv layer (batch 128) | XLA fwd+bwd ms | pemn_jax XLA-based ms | pemn_jax ms '
          '| PyTorch ms | pemn_jax / PyTorch |\n| --- | --- | --- | --- | --- | --- |')
    layer_table(args.warmup, args.steps, args.smoke)
  final = []
  for name in args.workloads.split(','):
    if args.in_process:
      s = in_process(name, args)
      best = 'torch'
    else:
      s = separate(name, args, SIDES if torch is not None else SIDES[:1])
      for k, (med, lo, hi) in s.items():
        print(f'{name} {k} (own process): median of {args.rounds} process medians {med:.4f} s, '
              f'IQR [{lo:.4f}, {hi:.4f}]', flush=True)
      best = min((k for k in s if k != 'pemn_jax'), key=lambda k: s[k][0], default=None)
      if best:
        print(f'{name} PyTorch at its best: {"channels_last" if best == "torch_cl" else "NCHW"}')
    if best not in s:
      continue
    final.append(f'{name} pemn_jax_s={s["pemn_jax"][0]:.4f} torch_s={s[best][0]:.4f} '
                 f'ratio={s["pemn_jax"][0] / s[best][0]:.3f}')
  print('\n'.join(final))


if __name__ == '__main__':
  main()
