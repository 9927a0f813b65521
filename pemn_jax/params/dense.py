"""Dense: every parameter trained -- the baseline every method is compared with."""

from __future__ import annotations

from pemn_jax.params import sections
from pemn_jax.params.base import Parameterization, init_leaves, size
from pemn_jax.pytrees import flatten, unflatten


class Dense(Parameterization):
  """Identity parameterization: the state *is* the params pytree."""

  def __init__(self, target, gain: float = 2.0):
    super().__init__(target)
    self.gain = float(gain)

  def init(self, key):
    return unflatten(init_leaves(self.leaves, key, self.gain))

  def materialize(self, state, seed=0, rng=None):
    del seed, rng
    flat = flatten(state)
    if set(flat) != set(self.leaves):
      raise ValueError(f'dense state leaves {sorted(flat)} != target leaves {sorted(self.leaves)}')
    return unflatten({p: flat[p].astype(v.dtype) for p, v in self.leaves.items()})

  def export(self, state, seed=0):
    return sections.nest(sections.PARAMS, flatten(state))

  def from_export(self, arrays, seed=0):
    return self.materialize(unflatten(sections.part(sections.PARAMS, arrays)), seed)

  def storage_bits(self):
    return {'floats': 32 * sum(size(v.shape) for v in self.leaves.values())}
