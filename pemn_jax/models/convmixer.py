"""ConvMixer (Trockman & Kolter), as used by PEMN for CIFAR (256/6, 256/8).

``use_bias=False`` is PEMN's ConvMixer (``bias=False`` on every conv and the
classifier); the default keeps biases, as the original ConvMixer does.
"""

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
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: BatchNorm(use_running_average=not train)  # noqa: E731
    p = self.patch_size
    b = self.use_bias
    x = nn.Conv(self.dim, (p, p), (p, p), padding='VALID', use_bias=b, kernel_init=he_normal)(x)
    x = bn()(nn.gelu(x, approximate=False))
    for _ in range(self.depth):
      y = DepthwiseConv(self.kernel_size, use_bias=b, impl=self.depthwise_impl)(x)
      x = x + bn()(nn.gelu(y, approximate=False))
      x = nn.Conv(self.dim, (1, 1), use_bias=b, kernel_init=he_normal)(x)
      x = bn()(nn.gelu(x, approximate=False))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=b, kernel_init=he_normal)(x)
