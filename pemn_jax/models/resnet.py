"""ResNets for 32x32 inputs: CIFAR ResNet-20/32/56 (He et al. 2016, 16/32/64
channels, 1x1-conv projection shortcuts) and ResNet-18 (3x3 stem, no pooling).

With ``gates=True`` every basic block gates its internal channels (conv1's
outputs, read only by conv2) and its residual branch. The channels of the
residual stream (block outputs, tied by the additions) are not gated: a stream
channel could only go where every block writing and reading it agrees, so the
stream is kept whole. ``block_widths`` (one internal width per block, 0 = the
residual branch removed) describes a sliced network.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from pemn_jax.gating.modules import Factor, Gate, GateStructure, gate_of
from pemn_jax.models.layers import BatchNorm, Conv, he_normal


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  width: int | None = None   # internal channels (conv1's outputs); 0 = no residual branch
  gates: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    s = (self.stride, self.stride)
    width = self.features if self.width is None else self.width
    y = None
    if width > 0:
      y = Conv(width, (3, 3), s, padding=1, use_bias=False, kernel_init=he_normal,
                  name='Conv_0')(x)
      y = nn.relu(bn('BatchNorm_0')(y))
      if self.gates:
        y = Gate(name='Gate_0')(y)
      y = Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=he_normal,
                  name='Conv_1')(y)
      y = bn('BatchNorm_1')(y)
      if self.gates:
        y = Gate(scalar=True, name='Gate_1')(y, any_of=gate_of(self, 'Gate_0'))
    if x.shape[-1] != self.features or self.stride != 1:
      x = Conv(self.features, (1, 1), s, use_bias=False, kernel_init=he_normal,
                  name='Conv_2')(x)
      x = bn('BatchNorm_2')(x)
    return nn.relu(x if y is None else x + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10
  gates: bool = False
  block_widths: Sequence[int] | None = None  # per block, in order (a sliced network)

  def blocks(self):
    """(scope name, features, stride, internal width) of every block."""
    out, k = [], 0
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for b in range(n):
        width = w if self.block_widths is None else int(self.block_widths[k])
        out.append((f'BasicBlock_{k}', w, 2 if (i > 0 and b == 0) else 1, width))
        k += 1
    return out

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.widths[0], (3, 3), padding=1, use_bias=False, kernel_init=he_normal,
                name='Conv_0')(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name='BatchNorm_0')(x))
    for name, w, stride, width in self.blocks():
      x = BasicBlock(w, stride, width, self.gates, name=name)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=he_normal, name='Dense_0')(x)

  def gate_structure(self) -> GateStructure:
    gates, any_of, leaves = {}, {}, {}
    for name, _, _, width in self.blocks():
      if width == 0:
        continue
      inner, branch = f'{name}/Gate_0/gate', f'{name}/Gate_1/gate'
      gates[inner], gates[branch] = 'channel', 'branch'
      any_of[branch] = inner
      add = lambda path, f, name=name: leaves.setdefault(f'{name}/{path}', []).append(f)  # noqa
      add('Conv_0/kernel', Factor(inner, 3))
      for leaf in ('scale', 'bias', 'mean', 'var'):
        add(f'BatchNorm_0/{leaf}', Factor(inner, 0))
      add('Conv_1/kernel', Factor(inner, 2))
      for path in ('Conv_0/kernel', 'Conv_1/kernel', 'BatchNorm_0/scale', 'BatchNorm_0/bias',
                   'BatchNorm_0/mean', 'BatchNorm_0/var', 'BatchNorm_1/scale',
                   'BatchNorm_1/bias', 'BatchNorm_1/mean', 'BatchNorm_1/var'):
        add(path, Factor(branch, None))

    def rebuild(open_):
      widths = []
      for name, _, _, width in self.blocks():
        if width == 0:
          widths.append(0)
          continue
        on = bool(open_[f'{name}/Gate_1/gate'][0])
        widths.append(int(open_[f'{name}/Gate_0/gate'].sum()) if on else 0)
      return {'block_widths': tuple(widths), 'gates': False}
    return GateStructure(gates, any_of, leaves, rebuild)


def cifar_resnet(depth: int, num_classes: int = 10, width: int = 16, gates: bool = False,
                 block_widths=None) -> ResNet:
  if (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}')
  n = (depth - 2) // 6
  return ResNet((n, n, n), (width, 2 * width, 4 * width), num_classes, gates, block_widths)


def resnet18(num_classes: int = 10, width: int = 64, gates: bool = False,
             block_widths=None) -> ResNet:
  return ResNet((2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width), num_classes, gates,
                block_widths)
