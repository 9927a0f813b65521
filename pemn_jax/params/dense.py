"""Dense: every parameter trained -- the baseline every method is compared with."""

from __future__ import annotations

from pemn_jax.params.base import Parameterization, flatten, init_leaves, size, unflatten


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
    return {f'params/{p}': v for p, v in flatten(state).items()}

  def from_export(self, arrays, seed=0):
    return self.materialize(unflatten({p[7:]: v for p, v in arrays.items()}), seed)

  def storage_bits(self):
    return {'floats': 32 * sum(size(v.shape) for v in self.leaves.values())}
