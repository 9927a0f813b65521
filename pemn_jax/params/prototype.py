"""PEMN prototypes: frozen random weights derived from a small random vector.

Modes (the generated leaves are taken in sorted path order):

* ``dense``: every leaf its own i.i.d. random weights (Kaiming normal: the
  edge-popup / supermask baselines' ``kaiming_normal`` weights).
* ``signed_constant``: every weight ``+-sqrt(gain / fan_in)`` with a random
  sign (hidden-networks' ``signed_constant`` init, its headline setting). The
  signs are integer hashes of (seed, leaf, index), not ``jax.random``, so they
  are the same in every JAX version and a model file stores none of them.
* ``ol`` (one-layer): the first leaf of each shape is the prototype; later
  leaves of the same shape repeat it.
* ``mp`` (max-layer padding): one random vector as long as the largest leaf,
  N_max; every leaf takes its first n_i values.
* ``rp`` (random pattern): a random vector of length
  ``d_v = int(N_max * ratio) + 1`` tiled to N_max (optionally randomly
  permuted); every leaf takes its first n_i values.

Scale: ``rescale=False`` (the default: the PEMN code's behaviour; its
``--rescale_var`` flag is never read) -- every leaf keeps the prototype's own
scale, the Kaiming std of the layer it was drawn for (for ``mp``/``rp`` the
largest layer). ``rescale=True`` multiplies each leaf by its own Kaiming-normal
std ``sqrt(gain / fan_in)`` instead. For ``dense``, ``signed_constant`` and
``ol`` both give the same weights.

Nothing here is trained and nothing of size N is stored: the weights are drawn
from the seed inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pemn_jax.ops.hashing import as_seed, mix, path_id
from pemn_jax.ops.permutation import permute_indices
from pemn_jax.ops.segments import Segments
from pemn_jax.ops.spmd import shard_flat
from pemn_jax.params.base import KERNELS, Split, init_std, leaf_key, size

MODES = ('dense', 'signed_constant', 'ol', 'mp', 'rp')


def rp_length(n_max: int, ratio: float) -> int:
  """d_v = int(N_max * ratio) + 1 (PEMN's random-pattern vector length)."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f'rp ratio must be in (0, 1], got {ratio}')
  return int(n_max * ratio) + 1


class Prototype(Split):
  """Frozen PEMN prototype weights (no trainable state but ``rest``)."""

  def __init__(self, target, mode: str = 'rp', ratio: float = 1e-3, permute: bool = False,
               rescale: bool = False, select: str = KERNELS, rest: str = 'train',
               gain: float = 2.0):
    super().__init__(target, select=select, rest=rest, gain=gain)
    if mode not in MODES:
      raise ValueError(f'prototype mode must be one of {MODES}, got {mode!r}')
    self.mode, self.ratio = mode, float(ratio)
    self.permute, self.rescale = bool(permute), bool(rescale)
    sizes = {p: size(self.leaves[p].shape) for p in self.generated}
    # As the reference, "first" is in module (creation) order: the prototype of
    # mp/rp is the first of the largest layers, ol's the first of each shape.
    in_order = [p for p in self.order if p in sizes]
    self.largest = max(in_order, key=lambda p: sizes[p])
    self.n_max = sizes[self.largest]
    self.length = rp_length(self.n_max, self.ratio) if mode == 'rp' else self.n_max
    first_of_shape = {}
    for p in in_order:
      first_of_shape.setdefault(self.leaves[p].shape, p)
    self.source_of = {p: first_of_shape[self.leaves[p].shape] for p in self.generated}
    # dense/ol: the leaves that own random values, drawn as one flat vector.
    self.owners = [p for p in self.generated if self.source_of[p] == p or mode == 'dense']
    self.owner_segments = Segments([size(self.leaves[p].shape) for p in self.owners])
    self.gen_segments = Segments([sizes[p] for p in self.generated])

  def init(self, key):
    return {'rest': self.init_rest(key)}

  def std(self, path: str) -> float:
    return init_std(path, self.leaves[path].shape, self.gain)

  def vector(self, seed):
    """The prototype's N(0, 1) values, drawn from the seed: mp/rp, the vector;
    dense/ol, the owning leaves' values, flat and concatenated."""
    n = self.length if self.mode in ('mp', 'rp') else self.owner_segments.total
    return shard_flat(jax.random.normal(leaf_key(seed, f'prototype/{self.mode}'), (n,),
                                        jnp.float32))

  def export_generated(self, state, seed):
    if self.mode == 'signed_constant':  # derived from the seed by integer hashing alone
      return {}
    return {'prototype': self.vector(seed)}

  def generate_from_export(self, arrays, seed):
    if self.mode == 'signed_constant':
      return self._generate(None, seed)
    return self._generate(arrays['prototype'], seed)

  def generate(self, state, seed):
    del state
    return self._generate(None if self.mode == 'signed_constant' else self.vector(seed), seed)

  def _generate(self, vec, seed):
    if self.mode == 'signed_constant':  # all leaves in one flat hash op
      seg = self.gen_segments
      ids = seg.ids()
      lids = seg.per_segment([path_id(p) for p in self.generated], jnp.uint32)[ids]
      bits = mix(as_seed(seed), lids, 0x51C0, seg.local(ids)) >> 31
      std = seg.per_segment([self.std(p) for p in self.generated], jnp.float32)[ids]
      flat = (1.0 - 2.0 * bits.astype(jnp.float32)) * std
      return dict(zip(self.generated, seg.split(flat, [self.leaves[p].shape
                                                       for p in self.generated]), strict=True))
    if self.mode in ('dense', 'ol'):
      shapes = [self.leaves[p].shape for p in self.owners]
      own = dict(zip(self.owners, self.owner_segments.split(vec, shapes), strict=True))
      return {p: own[self.source_of[p] if self.mode == 'ol' else p] * self.std(p)
              for p in self.generated}
    if self.mode == 'rp':  # the d_v vector tiled (optionally permuted) to N_max
      j = shard_flat(jnp.arange(self.n_max, dtype=jnp.uint32))
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
    if self.mode == 'signed_constant':
      return 0
    if self.mode == 'dense':
      return sum(size(self.leaves[p].shape) for p in self.generated)
    if self.mode == 'ol':
      return sum(size(self.leaves[p].shape) for p in set(self.source_of.values()))
    return self.length

  def storage_bits(self):
    return {'prototype_floats': 32 * self.prototype_floats(), **self.rest_bits()}
