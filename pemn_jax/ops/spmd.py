"""Where generated arrays are computed when a step runs on many devices.

Every generated weight here is a pure function of ``(seed, small state, flat
index)``, so no device needs another's part to compute its own. Inside
``generation(sharding)`` the flat index arrays that generation starts from
(``Segments.iota``, a ring's or a prototype's index range, a prototype's
random vector) carry a sharding constraint over all devices: XLA's SPMD
partitioner then gives each device only its slice of every elementwise hash,
permutation round, gather and mask op that follows, so the temporaries of
generation shrink as devices are added (see ``benchmarks/scaling.py`` and the
compiled HLO in ``tests/train/test_sharding.py``). Outside the context (one
device, or ``config.sharding.generate='replicated'``) nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_FLAT = contextvars.ContextVar('pemn_jax_generation_sharding', default=None)


@contextlib.contextmanager
def generation(sharding):
  """Within: 1-D generation arrays are laid out per ``sharding``.

  Args:
    sharding: a 1-D ``NamedSharding`` (e.g. ``PartitionSpec(('data',
      'fsdp'))``: split over every device), or None (no constraint).
  """
  token = _FLAT.set(sharding)
  try:
    yield
  finally:
    _FLAT.reset(token)


def shard_flat(x):
  """``x`` (1-D, inside jit) constrained to the active generation sharding;
  unchanged when none is active or ``x`` is smaller than the device count."""
  sharding = _FLAT.get()
  if sharding is None or x.ndim != 1 or x.shape[0] < sharding.mesh.size:
    return x
  return jax.lax.with_sharding_constraint(x, sharding)


def active():
  """The active generation sharding (or None)."""
  return _FLAT.get()


def take(table, idx):
  """``table[idx]`` for a small table (replicated) and flat indices laid out
  per the active generation sharding. Its gradient to ``table`` sums the
  cotangents of each device's slice into a local table-sized buffer
  (``jax.shard_map``) and all-reduces those: no device ever holds all the
  indices or all the cotangents (XLA's own partitioning of the transposed
  gather all-gathers the indices)."""
  sharding = _FLAT.get()
  if sharding is None or idx.ndim != 1 or idx.shape[0] < sharding.mesh.size:
    return jnp.take(table, idx, axis=0)
  return _sharded_take(table, idx, sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sharded_take(table, idx, sharding):
  return jnp.take(table, idx, axis=0)


def _sharded_take_fwd(table, idx, sharding):
  return jnp.take(table, idx, axis=0), (idx, table.shape[0])


def _sharded_take_bwd(sharding, res, g):
  idx, size = res
  mesh, axes = sharding.mesh, sharding.spec[0]
  pad = (-idx.shape[0]) % mesh.size
  idx = jax.lax.with_sharding_constraint(jnp.pad(idx, (0, pad)), sharding)
  g = jax.lax.with_sharding_constraint(jnp.pad(g, (0, pad)), sharding)

  def local(i, c):
    return jax.lax.psum(jnp.zeros((size,), c.dtype).at[i].add(c), axes)

  grad = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes)), out_specs=P(),
                       check_vma=False)(idx, g)
  return grad, None


_sharded_take.defvjp(_sharded_take_fwd, _sharded_take_bwd)
