"""ResNets for 32x32 inputs: CIFAR ResNet-20/32/56 (He et al. 2016, 16/32/64
channels, 1x1-conv projection shortcuts) and ResNet-18 (3x3 stem, no pooling)."""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from pemn_jax.models.layers import BatchNorm, he_normal


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: BatchNorm(use_running_average=not train)  # noqa: E731
    s = (self.stride, self.stride)
    y = nn.Conv(self.features, (3, 3), s, padding=1, use_bias=False, kernel_init=he_normal)(x)
    y = nn.relu(bn()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=he_normal)(y)
    y = bn()(y)
    if x.shape[-1] != self.features or self.stride != 1:
      x = nn.Conv(self.features, (1, 1), s, use_bias=False, kernel_init=he_normal)(x)
      x = bn()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, kernel_init=he_normal)(x)
    x = nn.relu(BatchNorm(use_running_average=not train)(x))
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for b in range(n):
        x = BasicBlock(w, 2 if (i > 0 and b == 0) else 1)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=he_normal)(x)


def cifar_resnet(depth: int, num_classes: int = 10, width: int = 16) -> ResNet:
  if (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}')
  n = (depth - 2) // 6
  return ResNet((n, n, n), (width, 2 * width, 4 * width), num_classes)


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
  return ResNet((2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width), num_classes)
