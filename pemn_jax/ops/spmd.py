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

import jax

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
