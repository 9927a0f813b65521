"""Many leaves as one flat array: static segment bookkeeping.

Generating or masking every leaf in one vectorized op (instead of a loop of
small ops) keeps compile times short and launches few kernels. Per-element
segment ids are computed from an iota inside jit (only O(#leaves) constants).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from pemn_jax.ops.spmd import shard_flat


class Segments:
  """Consecutive segments of the given (static) sizes in a flat array."""

  def __init__(self, sizes: Sequence[int]):
    self.sizes = np.asarray([int(s) for s in sizes], np.int64)
    if self.sizes.size == 0 or (self.sizes < 1).any():
      raise ValueError(f'segments need sizes >= 1, got {list(self.sizes)}')
    self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
    self.total = int(self.sizes.sum())
    if self.total >= 2**31:
      raise ValueError(f'segments of {self.total} elements in all exceed int32 indexing')

  def __len__(self):
    return len(self.sizes)

  def iota(self, dtype=jnp.int32):
    """``arange(total)``, laid out per the active generation sharding
    (``pemn_jax.ops.spmd``): every flat generation op starts from it."""
    return shard_flat(jnp.arange(self.total, dtype=dtype))

  def ids(self):
    """Segment id of each flat position, int32 of shape (total,)."""
    iota = self.iota(jnp.int32)
    if len(self) == 1:
      return jnp.zeros_like(iota)
    return jnp.searchsorted(jnp.asarray(self.starts[1:], jnp.int32), iota, side='right')

  def local(self, ids):
    """Index of each flat position inside its segment (uint32)."""
    iota = self.iota(jnp.uint32)
    return iota - jnp.asarray(self.starts, jnp.uint32)[ids]

  def per_segment(self, values, dtype):
    """A small (len,) constant array to gather per element with ``[ids]``."""
    return jnp.asarray(np.asarray(values), dtype)

  def split(self, flat, shapes):
    """Flat array -> list of arrays of the given shapes (static slices)."""
    return [flat[int(s):int(s) + int(n)].reshape(shape)
            for s, n, shape in zip(self.starts, self.sizes, shapes, strict=True)]
