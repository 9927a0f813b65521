"""Multi-layer perceptron and LeNet-5 (optionally gated, see models/gates.py)."""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from pemn_jax.gating.modules import Factor, Gate, GateStructure, _check_open
from pemn_jax.models.layers import Conv, he_normal


class MLP(nn.Module):
  hidden: Sequence[int] = (300, 100)
  num_classes: int = 10
  gates: bool = False  # a gate on every hidden unit

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, kernel_init=he_normal, name=f'Dense_{i}')(x))
      if self.gates:
        x = Gate(name=f'Gate_{i}')(x)
    return nn.Dense(self.num_classes, kernel_init=he_normal,
                    name=f'Dense_{len(self.hidden)}')(x)

  def gate_structure(self) -> GateStructure:
    gates, leaves = {}, {}
    for i in range(len(self.hidden)):
      g = f'Gate_{i}/gate'
      gates[g] = 'channel'
      leaves.setdefault(f'Dense_{i}/kernel', []).append(Factor(g, 1))
      leaves.setdefault(f'Dense_{i}/bias', []).append(Factor(g, 0))
      leaves.setdefault(f'Dense_{i + 1}/kernel', []).append(Factor(g, 0))

    def rebuild(open_):
      hidden = tuple(int(open_[f'Gate_{i}/gate'].sum()) for i in range(len(self.hidden)))
      for i, h in enumerate(hidden):
        _check_open('the MLP', h, f'unit of hidden layer {i}')
      return {'hidden': hidden, 'gates': False}
    return GateStructure(gates, {}, leaves, rebuild)


class LeNet5(nn.Module):
  """LeNet-5 (conv6-5x5, pool, conv16-5x5, pool, 120, 84, classes)."""
  num_classes: int = 10
  widths: Sequence[int] = (6, 16, 120, 84)
  gates: bool = False  # a gate on every channel / hidden unit

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    c1, c2, f1, f2 = self.widths
    gate = (lambda i, y: Gate(name=f'Gate_{i}')(y)) if self.gates else (lambda i, y: y)
    x = gate(0, nn.relu(Conv(c1, (5, 5), padding='SAME', kernel_init=he_normal,
                                name='Conv_0')(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = gate(1, nn.relu(Conv(c2, (5, 5), padding='VALID', kernel_init=he_normal,
                                name='Conv_1')(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))  # NHWC: feature (h * W + w) * c2 + c
    x = gate(2, nn.relu(nn.Dense(f1, kernel_init=he_normal, name='Dense_0')(x)))
    x = gate(3, nn.relu(nn.Dense(f2, kernel_init=he_normal, name='Dense_1')(x)))
    return nn.Dense(self.num_classes, kernel_init=he_normal, name='Dense_2')(x)

  def gate_structure(self) -> GateStructure:
    layers = [('Conv_0', 3, 'Conv_1', 2, 1), ('Conv_1', 3, 'Dense_0', 0, 1),
              ('Dense_0', 1, 'Dense_1', 0, 1), ('Dense_1', 1, 'Dense_2', 0, 1)]
    gates, leaves = {}, {}
    for i, (layer, out_axis, reader, in_axis, repeat) in enumerate(layers):
      g = f'Gate_{i}/gate'
      gates[g] = 'channel'
      leaves.setdefault(f'{layer}/kernel', []).append(Factor(g, out_axis))
      leaves.setdefault(f'{layer}/bias', []).append(Factor(g, 0))
      # Conv_1 -> Dense_0 through the flatten: channel fastest, so i % c2.
      leaves.setdefault(f'{reader}/kernel', []).append(Factor(g, in_axis, repeat))

    def rebuild(open_):
      widths = tuple(int(open_[f'Gate_{i}/gate'].sum()) for i in range(4))
      for name, w in zip(('conv1 channel', 'conv2 channel', 'fc1 unit', 'fc2 unit'), widths,
                         strict=True):
        _check_open('LeNet-5', w, name)
      return {'widths': widths, 'gates': False}
    return GateStructure(gates, {}, leaves, rebuild)
