"""Shared layers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from pemn_jax.kernels import conv
from pemn_jax.kernels.conv import conv_general_dilated

he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
# nn.Conv / nnx.Conv whose kernel gradient is pemn_jax.kernels.conv's on CPU (XLA's elsewhere).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
NnxConv = functools.partial(nnx.Conv, conv_general_dilated=conv_general_dilated)


class DepthwiseConv(nn.Module):
  """Depthwise 'SAME' conv with nn.Conv's param names and shapes.

  ``impl``: 'xla' (grouped convolution), 'shift' (shifted multiply-adds), or
  'auto' (on CPU ``kernels.conv.depthwise_conv``: oneDNN's where the
  convolutions take oneDNN, else shift; xla elsewhere: chosen per platform
  when lowered; xla within ``kernels.conv.forced('xla')``). All give the same
  function.
  """
  kernel_size: int
  use_bias: bool = True
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    k = self.kernel_size
    kernel = self.param('kernel', he_normal, (k, k, 1, c), jnp.float32)
    impl = self.impl
    if impl not in ('auto', 'shift', 'xla'):
      raise ValueError(f"DepthwiseConv impl must be 'auto', 'shift' or 'xla', got {impl!r}")
    grouped = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), 'SAME', feature_group_count=c, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    kernel = kernel.astype(x.dtype)
    if impl == 'auto' and conv.default_impl() == 'xla':
      impl = 'xla'
    if impl == 'auto':  # chosen per platform when lowered
      y = jax.lax.platform_dependent(x, kernel, cpu=conv.depthwise_conv, default=grouped)
    else:
      y = (conv.shifted_depthwise_conv if impl == 'shift' else grouped)(x, kernel)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return y
