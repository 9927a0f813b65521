"""Pytree helpers shared by the whole package: '/'-joined leaf paths, JSON-plain
values, finiteness, per-leaf reductions compiled a group at a time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def flatten(tree: Mapping) -> dict[str, Any]:
  """Nested dict -> ``{'a/b/c': leaf}`` in deterministic (sorted) order."""
  flat = traverse_util.flatten_dict(tree, sep='/') if tree else {}
  return dict(sorted(flat.items()))


def unflatten(flat: Mapping[str, Any]) -> dict:
  """``{'a/b/c': leaf}`` -> nested dict (``flatten``'s inverse)."""
  return traverse_util.unflatten_dict(dict(flat), sep='/') if flat else {}


def path_name(keypath) -> str:
  """``'state/rest/Dense_0/kernel'`` for a jax key path (dict keys, attribute
  names and sequence indices, '/'-joined)."""
  parts = []
  for k in keypath:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def plain(x):
  """As JSON stores it: tuples as lists, recursively (dicts and scalars kept)."""
  if isinstance(x, Mapping):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [plain(v) for v in x]
  return x


def all_finite(tree) -> bool:
  """Whether every float leaf of ``tree`` is finite: on device, one scalar
  to the host; a tree of host (numpy) arrays is checked where it is, with
  nothing compiled."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype if hasattr(x, 'dtype') else jnp.asarray(x).dtype,
                              jnp.floating)]
  if not leaves:
    return True
  if all(isinstance(x, np.ndarray) for x in leaves):
    return all(bool(np.isfinite(x).all()) for x in leaves)
  return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack(per_array(lambda rows: jnp.all(jnp.isfinite(rows), axis=1), leaves)))


# Arrays up to this many elements are processed stacked with the others of
# their size and dtype (see ``per_array``).
STACKED_ELEMENTS = 1 << 16


def per_array(fn, arrays) -> list:
  """``fn`` applied to each array (flattened), inside jit: ``[fn(a.reshape(1,
  -1))[0] for a in arrays]``, but arrays of at most ``STACKED_ELEMENTS``
  elements go through ``fn`` stacked with the others of their size and dtype
  (one kernel a group, not one an array: a deep network's state compiles ~2x
  faster); larger ones alone, where they lie.

  Args:
    fn: ``(k, n)`` rows -> ``(k, ...)`` one result a row; rows must not mix.
    arrays: arrays (traced).
  Returns:
    The results, in the order of ``arrays``.
  """
  out, groups = [None] * len(arrays), {}
  for i, a in enumerate(arrays):
    if a.size <= STACKED_ELEMENTS:
      groups.setdefault((a.size, a.dtype), []).append(i)
    else:
      out[i] = fn(a.reshape(1, -1))[0]
  for group in groups.values():
    results = fn(jnp.stack([arrays[i].reshape(-1) for i in group]))
    for j, i in enumerate(group):
      out[i] = results[j]
  return out
