"""Pruning baselines as an optax wrapper (JaxPruner-style: the masks live in
the optimizer state; the parameterization stays ``dense``).

Criteria (``config.prune.criterion``):

* ``magnitude``: train -> prune -> fine-tune (Han et al. 2015): dense training
  until ``begin``, then the smallest-|w| weights are removed at once and the
  survivors train on with the rest of the schedule.
* ``gmp``: gradual magnitude pruning (Zhu & Gupta 2017): sparsity follows
  ``s_f * (1 - (1 - t)^3)`` from ``begin`` to ``end``, masks recomputed from
  the current weights every ``every`` steps.
* ``magnitude_at_init``: the largest |w| *at initialization* -- with random
  init this is random pruning in disguise (kept only as that baseline).
* ``random``: a random mask from the seed at init.

Allocation of the sparsity over the pruned leaves (``allocation``):
``uniform`` (every leaf ``sparsity``), ``global`` (one magnitude threshold over
all of them), ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020: density of a leaf
proportional to ``sum(shape) / prod(shape)``, capped at 1, scaled to the
overall sparsity). Kept counts use the reference rule ``n - int(s * n)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pemn_jax.ops.topk import num_kept, topk_mask
from pemn_jax.pytrees import path_name

CRITERIA = ('magnitude', 'gmp', 'magnitude_at_init', 'random')
ALLOCATIONS = ('uniform', 'global', 'erk')


class PruneState(NamedTuple):
  inner: Any
  masks: Any
  count: jax.Array


def gmp_sparsity(step, final: float, begin: int, end: int):
  """Zhu & Gupta's cubic schedule: 0 before ``begin``, ``final`` after ``end``."""
  t = jnp.clip((step - begin) / max(1, end - begin), 0.0, 1.0)
  return final * (1.0 - (1.0 - t) ** 3)


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
  """Erdos-Renyi-Kernel densities of leaves of these shapes whose weighted mean
  is ``1 - sparsity`` (leaves that would exceed density 1 are kept dense and
  the rest rescaled, as in RigL)."""
  sizes = [math.prod(s) for s in shapes]
  raw = [sum(s) / math.prod(s) for s in shapes]
  dense: set[int] = set()
  while True:
    budget = (1.0 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
    free = [i for i in range(len(shapes)) if i not in dense]
    eps = budget / max(1e-30, sum(raw[i] * sizes[i] for i in free))
    over = [i for i in free if eps * raw[i] > 1.0]
    if not over:
      return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
    dense.update(over)


def kept_count(n: int, sparsity: float) -> int:
  """Weights a leaf of n keeps at ``sparsity``: ``n - int(sparsity * n)``, >= 1."""
  return num_kept(n, 1.0 - sparsity) if sparsity > 0 else n


def magnitude_masks(weights, sparsity: float, allocation: str, fraction) -> list:
  """Masks keeping the largest |w| of ``weights`` at ``fraction`` (a traced
  scalar in [0, 1]) of the final ``sparsity``, allocated per ``allocation``.
  At fraction 1 the kept counts are exactly ``kept_count`` (Python ints)."""
  def count(n, s):
    final = kept_count(n, s)
    ramp = n - jnp.floor(s * fraction * n).astype(jnp.int32)
    return jnp.where(fraction >= 1.0, final, jnp.clip(ramp, final, n))

  if allocation == 'global':  # one threshold over all pruned weights
    flat = jnp.concatenate([jnp.abs(w).reshape(-1) for w in weights])
    m = topk_mask(flat, kept=count(flat.size, sparsity)) > 0
    starts = np.cumsum([0] + [w.size for w in weights])
    return [m[a:a + w.size].reshape(w.shape) for a, w in zip(starts, weights, strict=False)]
  per_leaf = ([sparsity] * len(weights) if allocation == 'uniform' else
              [1.0 - d for d in erk_densities([w.shape for w in weights], sparsity)])
  return [topk_mask(jnp.abs(w), kept=count(w.size, s)) > 0
          for w, s in zip(weights, per_leaf, strict=True)]


def prune(tx: optax.GradientTransformation, sparsity: float, criterion: str,
          paths: Sequence[str], allocation: str = 'uniform', begin: int = 0, end: int = 1,
          every: int = 100, seed: int = 0) -> optax.GradientTransformation:
  """Wraps ``tx`` so that the leaves at ``paths`` are pruned to ``sparsity``.

  Args:
    tx: the optimizer of the dense params.
    sparsity: overall fraction of the pruned leaves' weights removed, in [0, 1).
    criterion: one of ``CRITERIA``.
    paths: '/'-joined paths of the leaves to prune (e.g. every kernel but the
      first layer's).
    allocation: one of ``ALLOCATIONS``.
    begin, end: steps: ``magnitude`` prunes at ``begin``; ``gmp`` ramps from
      ``begin`` to ``end``.
    every: GMP's mask-update interval.
    seed: for ``random`` masks.
  Returns:
    An optax transformation whose state carries the masks.
  """
  if criterion not in CRITERIA:
    raise ValueError(f'pruning criterion must be one of {CRITERIA}, got {criterion!r}')
  if allocation not in ALLOCATIONS:
    raise ValueError(f'pruning allocation must be one of {ALLOCATIONS}, got {allocation!r}')
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'pruning sparsity must be in [0, 1), got {sparsity}')
  if not paths:
    raise ValueError('pruning selects no leaf')
  paths = list(paths)

  def select(params):
    flat = {path_name(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = [p for p in paths if p not in flat]
    if missing:
      raise ValueError(f'pruning paths {missing} are not leaves of the params '
                       f'({sorted(flat)})')
    return [flat[p] for p in paths]

  def to_tree(params, masks_list):
    by_path = dict(zip(paths, masks_list, strict=True))
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: by_path.get(path_name(kp), jnp.ones((), bool)), params)

  def init(params):
    weights = select(params)
    if criterion == 'magnitude_at_init':
      masks = magnitude_masks(weights, sparsity, allocation, jnp.float32(1.0))
    elif criterion == 'random':
      keys = jax.random.split(jax.random.key(seed), len(weights))
      noise = [jax.random.uniform(k, w.shape) for k, w in zip(keys, weights, strict=True)]
      masks = magnitude_masks(noise, sparsity, allocation, jnp.float32(1.0))
    else:
      masks = [jnp.ones(w.shape, bool) for w in weights]
    return PruneState(tx.init(params), to_tree(params, masks), jnp.zeros((), jnp.int32))

  def update(updates, state, params):
    u, inner = tx.update(updates, state.inner, params)
    masks = state.masks
    if criterion in ('magnitude', 'gmp'):
      c = state.count
      if criterion == 'magnitude':
        due, frac = c == begin, jnp.float32(1.0)
      else:
        due = ((c - begin) % every == 0) & (c >= begin) & (c <= end)
        due = due | (c == end)
        frac = gmp_sparsity(c, 1.0, begin, end)
      new = optax.apply_updates(params, u)
      fresh = to_tree(params, magnitude_masks(select(new), sparsity, allocation, frac))
      masks = jax.tree.map(lambda m, f: jnp.where(due, f, m) if m.ndim else m, masks, fresh)
    u = jax.tree.map(lambda m, d, p: jnp.where(m, d, -p), masks, u, params)
    return u, PruneState(inner, masks, state.count + 1)

  return optax.GradientTransformation(init, update)
