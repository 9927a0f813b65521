"""RPG: a trainable ring of D floats generates every selected leaf.

Leaf i (n_i elements, in sorted path order) reads ring positions
``(offset_i + pi_i(j)) mod D`` for its element j, where ``offset_i`` is the sum
of the earlier leaves' sizes (so, over the whole model, each ring entry is used
``floor(T/D)`` or ``ceil(T/D)`` times), ``pi_i`` is a random permutation of
``[0, n_i)`` and each element gets a random sign; both derive from
``(seed, leaf path)`` inside jit. Leaf i is scaled by its initialization std
(``sqrt(gain / fan_in)``), so a N(0, 1) ring starts the generated network at the
usual He/LeCun variance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pemn_jax.ops.hashing import as_seed, mix, path_id
from pemn_jax.ops.permutation import permute_segments
from pemn_jax.ops.segments import Segments
from pemn_jax.params.base import KERNELS, Split, init_std, size


def resolve_dof(dof: float, num_params: int) -> int:
  """D from an absolute count (>= 1) or a fraction of N (0 < dof < 1)."""
  if dof <= 0:
    raise ValueError(f'ring dof must be > 0 (a count, or a fraction of N), got {dof}')
  d = int(dof) if dof >= 1 else int(round(dof * num_params))
  if dof >= 1 and d != dof:
    raise ValueError(f'ring dof >= 1 must be an integer count, got {dof}')
  return max(1, d)


class Ring(Split):
  """Recurrent Parameter Generator ring."""

  def __init__(self, target, dof: float = 0.01, select: str = KERNELS,
               rest: str = 'train', gain: float = 2.0):
    super().__init__(target, select=select, rest=rest, gain=gain)
    self.dof = resolve_dof(dof, self.num_params)
    self.offsets, t = {}, 0
    for p in self.generated:
      self.offsets[p] = t % self.dof
      t += size(self.leaves[p].shape)
    self.num_generated = t
    self.segments = Segments([size(self.leaves[p].shape) for p in self.generated])
    if self.dof + max(size(self.leaves[p].shape) for p in self.generated) >= 2**32:
      raise ValueError('ring dof + largest leaf size must be < 2**32')

  def init(self, key):
    k_ring, k_rest = jax.random.split(key)
    return {'ring': jax.random.normal(k_ring, (self.dof,), jnp.float32),
            'rest': self.init_rest(k_rest)}

  def flat_indices(self, seed):
    """Ring position and sign of every generated element (leaves in order,
    flattened). Computed from the seed on each call, never stored."""
    seg = self.segments
    ids = seg.ids()
    pos = permute_segments(seg, self.generated, seed, ids=ids)
    pos = (pos + seg.per_segment([self.offsets[p] for p in self.generated], jnp.uint32)[ids])
    pos = pos % jnp.uint32(self.dof)
    lids = seg.per_segment([path_id(p) for p in self.generated], jnp.uint32)[ids]
    bits = mix(as_seed(seed), lids, 0x5167, seg.local(ids)) >> 31
    return pos.astype(jnp.int32), 1.0 - 2.0 * bits.astype(jnp.float32), ids

  def indices(self, path: str, seed):
    """Ring positions and signs of one leaf's elements (flat order)."""
    pos, sign, _ = self.flat_indices(seed)
    i = self.generated.index(path)
    s, n = int(self.segments.starts[i]), int(self.segments.sizes[i])
    return pos[s:s + n], sign[s:s + n]

  def scale(self, path: str) -> float:
    return init_std(path, self.leaves[path].shape, self.gain)

  def generate(self, state, seed):
    ring = state['ring']
    if ring.shape != (self.dof,):
      raise ValueError(f'ring state has shape {ring.shape}, expected ({self.dof},)')
    pos, sign, ids = self.flat_indices(seed)
    scale = self.segments.per_segment([self.scale(p) for p in self.generated], jnp.float32)
    flat = jnp.take(ring, pos, axis=0) * (sign * scale[ids])
    shapes = [self.leaves[p].shape for p in self.generated]
    return dict(zip(self.generated, self.segments.split(flat, shapes), strict=True))

  def export_generated(self, state, seed):
    return {'ring': state['ring']}

  def generate_from_export(self, arrays, seed):
    return self.generate({'ring': arrays['ring']}, seed)

  def storage_bits(self):
    return {'ring_floats': 32 * self.dof, **self.rest_bits()}
