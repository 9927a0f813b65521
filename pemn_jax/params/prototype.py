"""PEMN prototypes: frozen random weights derived from a small random vector.

Modes (the generated leaves are taken in sorted path order):

* ``dense``: every leaf its own i.i.d. random weights (the edge-popup /
  supermask baseline's weights).
* ``ol`` (one-layer): the first leaf of each shape is the prototype; later
  leaves of the same shape repeat it.
* ``mp`` (max-layer padding): one random vector as long as the largest leaf,
  N_max; every leaf takes its first n_i values.
* ``rp`` (random pattern): a random vector of length
  ``d_v = int(N_max * ratio) + 1`` tiled to N_max (optionally randomly
  permuted); every leaf takes its first n_i values.

Scale: ``rescale=True`` (the default here) multiplies each leaf by its own
Kaiming-normal std ``sqrt(gain / fan_in)``. ``rescale=False`` is the PEMN code's
behaviour: every leaf keeps the prototype's own scale (the std of the layer the
prototype was drawn for; for ``mp``/``rp`` the largest layer). For ``dense`` and
``ol`` both give the same weights.

Nothing here is trained and nothing of size N is stored: the weights are drawn
from the seed inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pemn_jax.ops.permutation import permute_indices
from pemn_jax.ops.segments import Segments
from pemn_jax.params.base import KERNELS, Split, init_std, leaf_key, size

MODES = ('dense', 'ol', 'mp', 'rp')


def rp_length(n_max: int, ratio: float) -> int:
  """d_v = int(N_max * ratio) + 1 (PEMN's random-pattern vector length)."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f'rp ratio must be in (0, 1], got {ratio}')
  return int(n_max * ratio) + 1


class Prototype(Split):
  """Frozen PEMN prototype weights (no trainable state but ``rest``)."""

  def __init__(self, target, mode: str = 'rp', ratio: float = 1e-3, permute: bool = False,
               rescale: bool = True, select: str = KERNELS, rest: str = 'train',
               gain: float = 2.0):
    super().__init__(target, select=select, rest=rest, gain=gain)
    if mode not in MODES:
      raise ValueError(f'prototype mode must be one of {MODES}, got {mode!r}')
    self.mode, self.ratio = mode, float(ratio)
    self.permute, self.rescale = bool(permute), bool(rescale)
    sizes = {p: size(self.leaves[p].shape) for p in self.generated}
    self.largest = max(self.generated, key=lambda p: sizes[p])  # first of the largest
    self.n_max = sizes[self.largest]
    self.length = rp_length(self.n_max, self.ratio) if mode == 'rp' else self.n_max
    # ol: leaf -> the first leaf of the same shape.
    first_of_shape = {}
    self.source_of = {p: first_of_shape.setdefault(self.leaves[p].shape, p) for p in self.generated}
    # dense/ol: the leaves that own random values, drawn as one flat vector.
    self.owners = [p for p in self.generated if self.source_of[p] == p or mode == 'dense']
    self.owner_segments = Segments([size(self.leaves[p].shape) for p in self.owners])

  def init(self, key):
    return {'rest': self.init_rest(key)}

  def std(self, path: str) -> float:
    return init_std(path, self.leaves[path].shape, self.gain)

  def vector(self, seed):
    """The prototype's N(0, 1) values, drawn from the seed: mp/rp, the vector;
    dense/ol, the owning leaves' values, flat and concatenated."""
    n = self.length if self.mode in ('mp', 'rp') else self.owner_segments.total
    return jax.random.normal(leaf_key(seed, f'prototype/{self.mode}'), (n,), jnp.float32)

  def export_generated(self, state, seed):
    return {'prototype': self.vector(seed)}

  def generate_from_export(self, arrays, seed):
    return self._generate(arrays['prototype'], seed)

  def generate(self, state, seed):
    del state
    return self._generate(self.vector(seed), seed)

  def _generate(self, vec, seed):
    if self.mode in ('dense', 'ol'):
      shapes = [self.leaves[p].shape for p in self.owners]
      own = dict(zip(self.owners, self.owner_segments.split(vec, shapes), strict=True))
      return {p: own[self.source_of[p] if self.mode == 'ol' else p] * self.std(p)
              for p in self.generated}
    if self.mode == 'rp':  # the d_v vector tiled (optionally permuted) to N_max
      j = jnp.arange(self.n_max, dtype=jnp.uint32)
      if self.permute:
        j = permute_indices(j, self.n_max, seed, 'prototype/rp')
      vec = jnp.take(vec, (j % jnp.uint32(self.length)).astype(jnp.int32), axis=0)
    out = {}
    for p in self.generated:  # every leaf takes the first n_i values
      shape = self.leaves[p].shape
      scale = self.std(p if self.rescale else self.largest)
      out[p] = (vec[:size(shape)] * scale).reshape(shape)
    return out

  def prototype_floats(self) -> int:
    if self.mode == 'dense':
      return sum(size(self.leaves[p].shape) for p in self.generated)
    if self.mode == 'ol':
      return sum(size(self.leaves[p].shape) for p in set(self.source_of.values()))
    return self.length

  def storage_bits(self):
    return {'prototype_floats': 32 * self.prototype_floats(), **self.rest_bits()}
