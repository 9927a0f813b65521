"""Flax NNX models: twins of the Linen LeNet-5 and CIFAR ResNets.

Same layers, same param names and shapes as their Linen twins (attributes
named as Linen names its submodules), so a parameterization generates the
same weights for both and the two compute the same function; registered as
``lenet5_nnx`` and ``resnet20_nnx``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from pemn_jax.models.layers import NnxConv, he_normal


class LeNet5NNX(nnx.Module):
  """LeNet-5 in NNX (input 28x28x1)."""

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.Conv_0 = NnxConv(1, 6, (5, 5), padding='SAME', kernel_init=he_normal, rngs=rngs)
    self.Conv_1 = NnxConv(6, 16, (5, 5), padding='VALID', kernel_init=he_normal, rngs=rngs)
    self.Dense_0 = nnx.Linear(400, 120, kernel_init=he_normal, rngs=rngs)
    self.Dense_1 = nnx.Linear(120, 84, kernel_init=he_normal, rngs=rngs)
    self.Dense_2 = nnx.Linear(84, num_classes, kernel_init=he_normal, rngs=rngs)

  def __call__(self, x):
    x = nn.max_pool(nnx.relu(self.Conv_0(x)), (2, 2), (2, 2))
    x = nn.max_pool(nnx.relu(self.Conv_1(x)), (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.Dense_0(x))
    x = nnx.relu(self.Dense_1(x))
    return self.Dense_2(x)


class _BatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` whose output keeps the input's dtype, as Linen's does:
  NNX promotes with its float32 batch statistics, which put every later
  convolution of a bfloat16 step (``config.dtype``) back in float32."""

  def __call__(self, x, *args, **kwargs):
    return super().__call__(x, *args, **kwargs).astype(x.dtype)


def _bn(n, rngs):
  return _BatchNorm(n, momentum=0.9, epsilon=1e-5, rngs=rngs)  # as layers.BatchNorm


class BasicBlockNNX(nnx.Module):
  def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
    s = (stride, stride)
    self.Conv_0 = NnxConv(in_features, features, (3, 3), s, padding=1, use_bias=False,
                           kernel_init=he_normal, rngs=rngs)
    self.BatchNorm_0 = _bn(features, rngs)
    self.Conv_1 = NnxConv(features, features, (3, 3), padding=1, use_bias=False,
                           kernel_init=he_normal, rngs=rngs)
    self.BatchNorm_1 = _bn(features, rngs)
    self.project = in_features != features or stride != 1
    if self.project:
      self.Conv_2 = NnxConv(in_features, features, (1, 1), s, use_bias=False,
                             kernel_init=he_normal, rngs=rngs)
      self.BatchNorm_2 = _bn(features, rngs)

  def __call__(self, x):
    y = nnx.relu(self.BatchNorm_0(self.Conv_0(x)))
    y = self.BatchNorm_1(self.Conv_1(y))
    if self.project:
      x = self.BatchNorm_2(self.Conv_2(x))
    return nnx.relu(x + y)


class ResNetNNX(nnx.Module):
  """The CIFAR ResNet (models/resnet.py) in NNX, 3x3 stem, no pooling."""

  def __init__(self, stage_sizes: Sequence[int], widths: Sequence[int], num_classes: int = 10,
               in_channels: int = 3, *, rngs: nnx.Rngs):
    self.Conv_0 = NnxConv(in_channels, widths[0], (3, 3), padding=1, use_bias=False,
                           kernel_init=he_normal, rngs=rngs)
    self.BatchNorm_0 = _bn(widths[0], rngs)
    k, c = 0, widths[0]
    for i, (n, w) in enumerate(zip(stage_sizes, widths, strict=True)):
      for b in range(n):
        setattr(self, f'BasicBlock_{k}',
                BasicBlockNNX(c, w, 2 if (i > 0 and b == 0) else 1, rngs=rngs))
        c, k = w, k + 1
    self.num_blocks = k
    self.Dense_0 = nnx.Linear(c, num_classes, kernel_init=he_normal, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.BatchNorm_0(self.Conv_0(x)))
    for k in range(self.num_blocks):
      x = getattr(self, f'BasicBlock_{k}')(x)
    return self.Dense_0(jnp.mean(x, axis=(1, 2)))


def cifar_resnet_nnx(depth: int, num_classes: int = 10, width: int = 16, in_channels: int = 3,
                     *, rngs: nnx.Rngs):
  """NNX modules are built for their input: ``in_channels`` (1 for MNIST)."""
  if (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {depth}')
  n = (depth - 2) // 6
  return ResNetNNX((n, n, n), (width, 2 * width, 4 * width), num_classes, in_channels,
                   rngs=rngs)
