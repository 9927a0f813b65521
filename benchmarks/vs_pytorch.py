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

Both sides run in this process, interleaved one step each per round (so load
changes hit both alike); medians and interquartile ranges of ``--steps``
timed steps after ``--warmup``. pemn_jax is timed three times: as it runs
by default (``pemn_jax.kernels.conv`` 'auto': oneDNN's convolutions through
XLA's FFI where ``pip install -e '.[cpu]'`` installed them, see
``pemn_jax.kernels.dnnl_conv``), with its XLA-based kernel gradient
(``PEMN_JAX_CONV=cpu``) and with XLA's own convolution gradients
(``PEMN_JAX_CONV=xla``), so each gain is measured in the same run. PyTorch (CPU build, ``pip install
torch==2.13.0``) is needed by this benchmark only, never by the library.

    .venv/bin/python benchmarks/vs_pytorch.py
    .venv/bin/python benchmarks/vs_pytorch.py --workloads resnet20_dense_sgd --steps 20
    .venv/bin/python benchmarks/vs_pytorch.py --layers       # per conv layer shape, fwd+bwd
    .venv/bin/python benchmarks/vs_pytorch.py --smoke        # tiny (checks the script)

Last lines, one per workload:
    <workload> pemn_jax_s=<a> torch_s=<b> ratio=<a/b>
"""

from __future__ import annotations

import argparse
import statistics
import time

from pemn_jax.kernels import cpu_tuning

CPU_TUNING = cpu_tuning.configure()  # before JAX's CPU backend starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from pemn_jax import models  # noqa: E402
from pemn_jax import params as param_lib  # noqa: E402
from pemn_jax.kernels import conv as fast_conv  # noqa: E402
from pemn_jax.kernels import dnnl_conv  # noqa: E402
from pemn_jax.train import create_train_state, make_train_step  # noqa: E402

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


def torch_step(name, batch, shape, smoke):
  torch.manual_seed(0)
  x = torch.randn(batch, shape[2], shape[0], shape[1])
  y = torch.arange(batch) % 10
  if name == 'resnet20_dense_sgd':
    net = torch_resnet20(width=4 if smoke else 16, blocks=1 if smoke else 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  else:
    net = (torch_masked_convmixer(dim=16, depth=1) if smoke else torch_masked_convmixer())
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


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--workloads', default=','.join(WORKLOADS))
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--threads', type=int, default=0, help='torch threads (0: all cores)')
  ap.add_argument('--layers', action='store_true', help='also: per conv layer shape, fwd+bwd ms')
  ap.add_argument('--smoke', action='store_true', help='tiny models, batch 8, 1 step')
  args = ap.parse_args()
  if torch is None and not args.smoke:
    raise SystemExit('this benchmark needs PyTorch (CPU build): pip install torch==2.13.0')
  if torch is None:
    print('PyTorch is not installed: the smoke run checks the JAX side only')
  elif args.threads:
    torch.set_num_threads(args.threads)
  if args.smoke:
    args.batch, args.steps, args.warmup = 8, 1, 1
  shape = (28, 28, 1) if args.smoke else (32, 32, 3)
  tv = f'{torch.__version__} ({torch.get_num_threads()} threads)' if torch else 'absent'
  dnnl = (f'oneDNN {dnnl_conv.version()}' if dnnl_conv.available() else
          f'unavailable ({dnnl_conv.unavailable_reason()})')
  print(f'jax {jax.__version__} ({jax.default_backend()}), torch {tv}, batch {args.batch}, '
        f'{args.steps} timed steps, CPU tuning: {CPU_TUNING}, oneDNN convolutions: {dnnl}')
  if args.layers and torch is not None:
    print('| conv layer (batch 128) | XLA fwd+bwd ms | pemn_jax XLA-based ms | pemn_jax ms '
          '| PyTorch ms | pemn_jax / PyTorch |\n| --- | --- | --- | --- | --- | --- |')
    layer_table(args.warmup, args.steps, args.smoke)
  final = []
  for name in args.workloads.split(','):
    if name not in WORKLOADS:
      raise SystemExit(f'unknown workload {name!r}; known: {list(WORKLOADS)}')
    tshape = (32, 32, 3)  # the torch models take CIFAR shapes even in the smoke run
    fns = {'pemn_jax': jax_step(name, 'auto', args.batch, shape, args.smoke),
           'pemn_jax_cpu': jax_step(name, 'cpu', args.batch, shape, args.smoke),
           'pemn_jax_xla': jax_step(name, 'xla', args.batch, shape, args.smoke),
           'torch': torch_step(name, args.batch, tshape, args.smoke) if torch else None}
    if torch is None:
      fns.pop('torch')
    t = timed(fns, args.warmup, args.steps)
    s = {k: stats(v) for k, v in t.items()}
    for k, (med, lo, hi) in s.items():
      print(f'{name} {k}: median {med:.4f} s, IQR [{lo:.4f}, {hi:.4f}]', flush=True)
    print(f'{name} XLA-gradient / fast-path: {s["pemn_jax_xla"][0] / s["pemn_jax"][0]:.2f}x, '
          f'XLA-based fast path / fast path: {s["pemn_jax_cpu"][0] / s["pemn_jax"][0]:.2f}x')
    if 'torch' not in s:
      continue
    final.append(f'{name} pemn_jax_s={s["pemn_jax"][0]:.4f} torch_s={s["torch"][0]:.4f} '
                 f'ratio={s["pemn_jax"][0] / s["torch"][0]:.3f}')
  print('\n'.join(final))


if __name__ == '__main__':
  main()
