"""ResNets (He et al. 2016): for 32x32 inputs, CIFAR ResNet-20/32/56 (16/32/64
channels, 1x1-conv projection shortcuts) and ResNet-18 (3x3 stem, no
pooling); ImageNet-style ResNet-18/34 (basic blocks) and ResNet-50
(bottlenecks) with torchvision's layers (7x7 stride-2 stem + 3x3 max pool,
stride on the bottleneck's 3x3 conv, "v1.5"): ``resnet_imagenet``.

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


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (``4 * features`` outputs), torchvision's."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    out, s = 4 * self.features, (self.stride, self.stride)
    y = nn.relu(bn('BatchNorm_0')(Conv(self.features, (1, 1), use_bias=False,
                                       kernel_init=he_normal, name='Conv_0')(x)))
    y = nn.relu(bn('BatchNorm_1')(Conv(self.features, (3, 3), s, padding=1, use_bias=False,
                                       kernel_init=he_normal, name='Conv_1')(y)))
    y = bn('BatchNorm_2')(Conv(out, (1, 1), use_bias=False, kernel_init=he_normal,
                               name='Conv_2')(y))
    if x.shape[-1] != out or self.stride != 1:
      x = bn('BatchNorm_3')(Conv(out, (1, 1), s, use_bias=False, kernel_init=he_normal,
                                 name='Conv_3')(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10
  gates: bool = False
  block_widths: Sequence[int] | None = None  # per block, in order (a sliced network)
  stem: str = 'cifar'         # 'cifar': 3x3 conv; 'imagenet': 7x7/2 conv + 3x3/2 max pool
  bottleneck: bool = False    # Bottleneck blocks (4x expansion) instead of BasicBlock

  def blocks(self):
    """(scope name, features, stride, internal width) of every block."""
    out, k = [], 0
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for b in range(n):
        width = w if self.block_widths is None else int(self.block_widths[k])
        name = f'{"Bottleneck" if self.bottleneck else "BasicBlock"}_{k}'
        out.append((name, w, 2 if (i > 0 and b == 0) else 1, width))
        k += 1
    return out

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stem not in ('cifar', 'imagenet'):
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    if self.bottleneck and (self.gates or self.block_widths is not None):
      raise ValueError('gates and block_widths are for basic-block ResNets')
    big = self.stem == 'imagenet'
    x = Conv(self.widths[0], (7, 7) if big else (3, 3), 2 if big else 1, padding=3 if big else 1,
             use_bias=False, kernel_init=he_normal, name='Conv_0')(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name='BatchNorm_0')(x))
    if big:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for name, w, stride, width in self.blocks():
      x = (Bottleneck(w, stride, name=name)(x, train) if self.bottleneck else
           BasicBlock(w, stride, width, self.gates, name=name)(x, train))
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


IMAGENET_DEPTHS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False),
                   50: ((3, 4, 6, 3), True)}


def resnet_imagenet(depth: int, num_classes: int = 1000, width: int = 64, gates: bool = False,
                    block_widths=None) -> ResNet:
  """torchvision's ResNet-18/34/50 (``resnet18/34/50(num_classes)``): the same
  layers and parameter count (11,689,512 / 21,797,672 / 25,557,032 at 1000
  classes; batch-norm statistics aside)."""
  if depth not in IMAGENET_DEPTHS:
    raise ValueError(f'ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}, '
                     f'got {depth}')
  stages, bottleneck = IMAGENET_DEPTHS[depth]
  return ResNet(stages, tuple(width * 2**i for i in range(4)), num_classes, gates, block_widths,
                stem='imagenet', bottleneck=bottleneck)
