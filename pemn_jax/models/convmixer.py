"""ConvMixer (Trockman & Kolter), as used by PEMN for CIFAR (256/6, 256/8)."""

from __future__ import annotations

from flax import linen as nn

from pemn_jax.models.layers import BatchNorm, DepthwiseConv, he_normal


class ConvMixer(nn.Module):
  dim: int = 256
  depth: int = 8
  kernel_size: int = 5
  patch_size: int = 2
  num_classes: int = 10
  depthwise_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: BatchNorm(use_running_average=not train)  # noqa: E731
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), (p, p), padding='VALID', kernel_init=he_normal)(x)
    x = bn()(nn.gelu(x))
    for _ in range(self.depth):
      y = DepthwiseConv(self.kernel_size, impl=self.depthwise_impl)(x)
      x = x + bn()(nn.gelu(y))
      x = nn.Conv(self.dim, (1, 1), kernel_init=he_normal)(x)
      x = bn()(nn.gelu(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=he_normal)(x)
