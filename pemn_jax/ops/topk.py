"""Exact per-layer top-k masks with a straight-through gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def num_kept(n: int, keep: float) -> int:
  """Number of elements a top-k mask keeps: ``round(keep * n)``, at least 1."""
  if not 0.0 < keep <= 1.0:
    raise ValueError(f'mask keep fraction must be in (0, 1], got {keep}')
  return max(1, min(n, int(round(keep * n))))


def topk_mask(values, keep: float):
  """0/1 mask (values' dtype) with exactly ``num_kept(values.size, keep)`` ones
  at the largest entries of ``values`` (ties broken by position)."""
  flat = values.reshape(-1)
  n = flat.shape[0]
  m = num_kept(n, keep)
  if m == n:
    return jnp.ones_like(values)
  order = jnp.argsort(flat, stable=True)
  mask = jnp.zeros((n,), values.dtype).at[order[n - m:]].set(1)
  return mask.reshape(values.shape)


def straight_through(hard, soft):
  """``hard`` in the forward pass; gradient flows to ``soft`` unchanged."""
  return soft + jax.lax.stop_gradient(hard - soft)


def edge_popup_mask(scores, keep: float):
  """Edge-popup mask: top-k of ``|scores|``; straight-through gradient to
  ``|scores|`` (and so ``sign(scores)`` times it to ``scores``)."""
  a = jnp.abs(scores)
  return straight_through(topk_mask(jax.lax.stop_gradient(a), keep), a)


def segment_topk_mask(values, segments, kept):
  """``topk_mask`` for every segment of a flat array at once (one sort).

  Args:
    values: flat array of length ``segments.total``.
    segments: a ``Segments``.
    kept: static per-segment counts of ones (``num_kept`` of each).
  Returns a flat 0/1 mask in ``values``' dtype; ties are broken by position,
  exactly as ``topk_mask``.
  """
  ids = segments.ids()
  iota = jnp.arange(segments.total, dtype=jnp.int32)
  seg_sorted, _, order = jax.lax.sort((ids, values, iota), num_keys=2, is_stable=True)
  rank = iota - segments.per_segment(segments.starts, jnp.int32)[seg_sorted]
  drop = segments.per_segment(segments.sizes - np.asarray(kept), jnp.int32)[seg_sorted]
  return jnp.zeros_like(values).at[order].set((rank >= drop).astype(values.dtype))


def segment_edge_popup_mask(scores, segments, keeps):
  """Edge-popup masks of all segments of a flat score array, one sort."""
  a = jnp.abs(scores)
  kept = [num_kept(int(n), k) for n, k in zip(segments.sizes, keeps, strict=True)]
  return straight_through(segment_topk_mask(jax.lax.stop_gradient(a), segments, kept), a)
