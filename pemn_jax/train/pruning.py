"""Pruning baselines as an optax wrapper (JaxPruner-style: the masks live in
the optimizer state; the parameterization stays ``dense``).

* ``magnitude``: at init keep the largest-|w| fraction of each selected leaf,
  train the survivors, keep the rest at 0 (sparse from scratch).
* ``random``: the same with a random mask from the seed.
* ``gmp``: gradual magnitude pruning (Zhu & Gupta): sparsity follows
  ``s_f * (1 - (1 - t)^3)`` from ``begin`` to ``end`` step, masks recomputed
  from the current weights every ``every`` steps.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pemn_jax.ops.topk import topk_mask
from pemn_jax.params.base import KERNELS

CRITERIA = ('magnitude', 'random', 'gmp')


class PruneState(NamedTuple):
  inner: Any
  masks: Any
  count: jax.Array


def _selected(params, select):
  rx = re.compile(select)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(rx.search('/'.join(str(getattr(k, 'key', k)) for k in path))), params)


def gmp_sparsity(step, final: float, begin: int, end: int):
  t = jnp.clip((step - begin) / max(1, end - begin), 0.0, 1.0)
  return final * (1.0 - (1.0 - t) ** 3)


def _kept(n: int, sparsity) -> jax.Array:
  return jnp.maximum(1, jnp.round((1.0 - sparsity) * n)).astype(jnp.int32)


def prune(tx: optax.GradientTransformation, sparsity: float, criterion: str,
          select: str = KERNELS, begin: int = 0, end: int = 1, every: int = 100,
          seed: int = 0) -> optax.GradientTransformation:
  """Wraps ``tx`` so that selected leaves are pruned to ``sparsity``."""
  if criterion not in CRITERIA:
    raise ValueError(f'pruning criterion must be one of {CRITERIA}, got {criterion!r}')
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'pruning sparsity must be in [0, 1), got {sparsity}')

  def init(params):
    sel = _selected(params, select)
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(sel)
    masks = []
    for i, (p, on) in enumerate(zip(leaves, flags, strict=True)):
      if not on:
        masks.append(jnp.ones((), bool))
      elif criterion == 'magnitude':
        masks.append(topk_mask(jnp.abs(p), 1.0 - sparsity).astype(bool))
      elif criterion == 'random':
        key = jax.random.fold_in(jax.random.key(seed), i)
        masks.append(topk_mask(jax.random.uniform(key, p.shape), 1.0 - sparsity).astype(bool))
      else:
        masks.append(jnp.ones(p.shape, bool))
    return PruneState(tx.init(params), jax.tree.unflatten(treedef, masks),
                      jnp.zeros((), jnp.int32))

  def update(updates, state, params):
    u, inner = tx.update(updates, state.inner, params)
    masks = state.masks
    if criterion == 'gmp':
      new = optax.apply_updates(params, u)
      s = gmp_sparsity(state.count, sparsity, begin, end)
      due = ((state.count - begin) % every == 0) & (state.count >= begin) & (state.count <= end)
      due = due | (state.count == end)
      masks = jax.tree.map(
          lambda m, w: jnp.where(due, topk_mask(jnp.abs(w), kept=_kept(w.size, s)) > 0, m)
          if m.ndim else m, masks, new)
    u = jax.tree.map(lambda m, d, p: jnp.where(m, d, -p), masks, u, params)
    return u, PruneState(inner, masks, state.count + 1)

  return optax.GradientTransformation(init, update)
