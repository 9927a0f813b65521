"""ConvMixer (Trockman & Kolter), as used by PEMN for CIFAR (256/6, 256/8).

``use_bias=False`` is PEMN's ConvMixer (``bias=False`` on every conv and the
classifier); the default keeps biases, as the original ConvMixer does.
``gates=True`` gates each block's residual (depthwise) branch; ``blocks``
(one bool per block) describes a sliced network without some of them. The
channels are not gated: every block reads and writes the whole stream, and a
zeroed stream channel would come back through the next branch's BN bias.
Module names are given explicitly (the same ones Flax would generate), so a
sliced network keeps the names of the blocks it keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from pemn_jax.gating.modules import Factor, Gate, GateStructure
from pemn_jax.models.layers import BatchNorm, Conv, DepthwiseConv, he_normal


def _gelu(x):
  return nn.gelu(x, approximate=False)  # PyTorch's nn.GELU (exact), as the reference


class ConvMixer(nn.Module):
  dim: int = 256
  depth: int = 8
  kernel_size: int = 5
  patch_size: int = 2
  num_classes: int = 10
  depthwise_impl: str = 'auto'
  use_bias: bool = True
  gates: bool = False
  blocks: Sequence[bool] | None = None  # residual branch present, per block

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    p, b = self.patch_size, self.use_bias
    x = Conv(self.dim, (p, p), (p, p), padding='VALID', use_bias=b, kernel_init=he_normal,
                name='Conv_0')(x)
    x = bn('BatchNorm_0')(_gelu(x))
    for i in range(self.depth):
      if self.blocks is None or self.blocks[i]:
        y = DepthwiseConv(self.kernel_size, use_bias=b, impl=self.depthwise_impl,
                          name=f'DepthwiseConv_{i}')(x)
        y = bn(f'BatchNorm_{2 * i + 1}')(_gelu(y))
        if self.gates:
          y = Gate(scalar=True, name=f'Gate_{i}')(y)
        x = x + y
      x = Conv(self.dim, (1, 1), use_bias=b, kernel_init=he_normal, name=f'Conv_{i + 1}')(x)
      x = bn(f'BatchNorm_{2 * i + 2}')(_gelu(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=b, kernel_init=he_normal, name='Dense_0')(x)

  def gate_structure(self) -> GateStructure:
    gates, leaves = {}, {}
    present = [self.blocks is None or self.blocks[i] for i in range(self.depth)]
    for i in range(self.depth):
      if not present[i]:
        continue
      g = f'Gate_{i}/gate'
      gates[g] = 'branch'
      paths = [f'DepthwiseConv_{i}/kernel'] + ([f'DepthwiseConv_{i}/bias'] if self.use_bias
                                               else [])
      paths += [f'BatchNorm_{2 * i + 1}/{k}' for k in ('scale', 'bias', 'mean', 'var')]
      for path in paths:
        leaves[path] = [Factor(g, None)]

    def rebuild(open_):
      kept = tuple(bool(present[i] and open_[f'Gate_{i}/gate'][0]) if present[i] else False
                   for i in range(self.depth))
      return {'blocks': kept, 'gates': False}
    return GateStructure(gates, {}, leaves, rebuild)
