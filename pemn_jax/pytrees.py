"""Pytree helpers shared by the whole package: '/'-joined leaf paths, JSON-plain
values, finiteness."""

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
  # Small leaves checked stacked with the others of their size and dtype (one
  # kernel a group, not one a leaf: a deep network's state compiles ~2x
  # faster); large ones alone, where they lie.
  flags, groups = [], {}
  for x in leaves:
    if x.size <= 1 << 16:
      groups.setdefault((x.size, x.dtype), []).append(x.reshape(-1))
    else:
      flags.append(jnp.all(jnp.isfinite(x)))
  flags += [jnp.all(jnp.isfinite(jnp.stack(g))) for g in groups.values()]
  return jnp.all(jnp.stack(flags))
