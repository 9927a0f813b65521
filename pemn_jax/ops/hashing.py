"""Counter-based (stateless) integer hashing on uint32, usable inside jit.

Everything random that a parameterization needs *per element* (permutation
rounds, sign flips) is a pure function of ``(seed, leaf id, index)`` built from
these helpers, so nothing of size N has to be stored: it is recomputed inside
the jitted step from a scalar seed.
"""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np

_U32 = jnp.uint32


def lowbias32(x):
  """A strong 32-bit integer finalizer (C. Wellons' ``lowbias32``); elementwise."""
  x = jnp.asarray(x, _U32)
  x = x ^ (x >> 16)
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * _U32(0x846CA68B)
  x = x ^ (x >> 16)
  return x


def mix(*words):
  """Hashes a sequence of uint32 words (scalars or arrays, broadcast) into one."""
  h = jnp.asarray(0x9E3779B9, _U32)
  for w in words:
    h = lowbias32(h ^ (jnp.asarray(w, _U32) + _U32(0x6A09E667)))
  return h


def path_id(path: str) -> int:
  """A stable 32-bit id for a leaf path (same in every process and run)."""
  return zlib.crc32(path.encode('utf-8')) & 0xFFFFFFFF


def as_seed(seed):
  """Seed as a uint32 scalar array. Pass an *array* into jitted code (not a
  Python int) so XLA computes the per-element hashes at run time instead of
  constant-folding O(N) tables into the executable."""
  if isinstance(seed, (int, np.integer)):
    seed = int(seed) & 0xFFFFFFFF
  return jnp.asarray(seed, _U32)

