"""Multi-layer perceptron and LeNet-5."""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from pemn_jax.models.layers import he_normal


class MLP(nn.Module):
  hidden: Sequence[int] = (300, 100)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h, kernel_init=he_normal)(x))
    return nn.Dense(self.num_classes, kernel_init=he_normal)(x)


class LeNet5(nn.Module):
  """LeNet-5 (conv6-5x5, pool, conv16-5x5, pool, 120, 84, classes)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(6, (5, 5), padding='SAME', kernel_init=he_normal)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (5, 5), padding='VALID', kernel_init=he_normal)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120, kernel_init=he_normal)(x))
    x = nn.relu(nn.Dense(84, kernel_init=he_normal)(x))
    return nn.Dense(self.num_classes, kernel_init=he_normal)(x)
