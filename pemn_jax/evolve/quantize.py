"""Quantization of a layer's surviving weights, and per-layer bit allocation.

A layer's survivors (its nonzero weights) are replaced by ``codebook[symbol]``
with a codebook of ``2^bits`` float32 levels:

* ``uniform``: levels evenly spaced over [min, max] of the survivors;
* ``kmeans``: Lloyd's algorithm in 1-D (levels initialized at quantiles);
* ``log``: signed powers of two, ``+-max|w| * 2^-e``.

Zeros are not levels: the positions of the survivors are stored apart, so no
level is spent on 0. ``allocate_bits`` picks, per layer, the bits and method
minimizing the total bits of the values under a budget on a fitness (the
divergence from the teacher, or the accuracy drop), greedily: from 8 bits,
repeatedly lower by one bit the layer where that costs the least fitness per
bit saved, among the moves that stay within the budget.

Why not Qwix: docs/directed_evolution.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from pemn_jax.export.codecs import QUANT_METHODS as METHODS
from pemn_jax.export.codecs import Quantized


def levels(values: np.ndarray, bits: int, method: str) -> np.ndarray:
  """The codebook (float32, ``2^bits`` entries) of ``method`` for these values."""
  v = np.asarray(values, np.float64).reshape(-1)
  n_levels = 1 << bits
  if v.size == 0:
    return np.zeros(n_levels, np.float32)
  if method == 'uniform':
    return np.linspace(v.min(), v.max(), n_levels).astype(np.float32)
  if method == 'log':
    scale = np.abs(v).max() or 1.0
    half = max(1, n_levels // 2)
    mags = scale * 2.0 ** -np.arange(half)
    return np.concatenate([-mags, mags])[:n_levels].astype(np.float32)
  if method == 'kmeans':
    # Lloyd's iterations in 1-D: each level's values are a contiguous run of
    # the sorted values, (edge below, edge above], so a pass costs
    # O(levels log n) over prefix sums instead of O(n log levels).
    v = np.sort(v)
    prefix = np.concatenate([[0.0], np.cumsum(v)])
    centers = np.quantile(v, (np.arange(n_levels) + 0.5) / n_levels)
    for _ in range(30):
      centers = np.sort(centers)
      bounds = np.concatenate([[0], np.searchsorted(v, (centers[1:] + centers[:-1]) / 2,
                                                    side='right'), [v.size]])
      sums, cnt = np.diff(prefix[bounds]), np.diff(bounds)
      new = np.where(cnt > 0, sums / np.maximum(cnt, 1), centers)
      if np.allclose(new, centers):
        break
      centers = new
    return np.sort(centers).astype(np.float32)
  raise ValueError(f'quantization method must be one of {METHODS}, got {method!r}')


def assign(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """The index of the nearest level of each value."""
  order = np.argsort(codebook, kind='stable')
  sorted_cb = codebook[order].astype(np.float64)
  edges = (sorted_cb[1:] + sorted_cb[:-1]) / 2
  return order[np.searchsorted(edges, np.asarray(values, np.float64))]


def quantize(w: np.ndarray, bits: int, method: str) -> Quantized:
  """A layer's nonzero weights quantized to ``2^bits`` levels of ``method``."""
  if not 1 <= bits <= 8:
    raise ValueError(f'bits must be in [1, 8], got {bits}')
  w = np.asarray(w, np.float32)
  mask = w != 0
  values = w[mask]
  codebook = levels(values, bits, method)
  return Quantized(mask, assign(values, codebook), codebook, method, bits)


@dataclasses.dataclass
class Allocation:
  """Per-layer quantization chosen by ``allocate_bits``."""
  layers: dict[str, Quantized]
  fitness: float
  evaluations: int
  history: list

  @property
  def value_bits(self) -> int:
    return sum(q.nnz * q.bits for q in self.layers.values())

  @property
  def avg_bits(self) -> float:
    nnz = sum(q.nnz for q in self.layers.values())
    return self.value_bits / max(1, nnz)


def allocate_bits(weights: dict[str, np.ndarray], fitness: Callable[[dict], float],
                  budget: float, min_bits: int = 2, max_bits: int = 8,
                  methods=METHODS) -> Allocation:
  """Greedy per-layer bit allocation under ``fitness(dense weights) <= budget``.

  Args:
    weights: ``{leaf path: pruned weights}`` of the layers to quantize.
    fitness: the divergence (or accuracy drop) of the model with these layers
      replaced (lower is better); the other params stay as they are.
    budget: the largest fitness allowed.
    min_bits, max_bits: the range of bits per layer.
    methods: quantizers to try at every step (the best one is kept).
  Returns:
    The allocation (its fitness is <= budget unless even ``max_bits`` everywhere
    exceeds it, in which case that is returned).
  """
  def best(path, bits):
    cands = [quantize(weights[path], bits, m) for m in methods]
    scores = [fitness({**current_dense, path: q.dense()}) for q in cands]
    i = int(np.argmin(scores))
    return cands[i], scores[i], len(cands)

  current = {p: quantize(w, max_bits, 'kmeans') for p, w in weights.items()}
  current_dense = {p: q.dense() for p, q in current.items()}
  fit = fitness(current_dense)
  evals, history = 1, [(max_bits, fit)]
  while True:
    moves = []
    for path, q in current.items():
      if q.bits <= min_bits or q.nnz == 0:
        continue
      cand, score, n = best(path, q.bits - 1)
      evals += n
      if score <= budget:
        moves.append(((score - fit) / q.nnz, path, cand, score))
    if not moves:
      break
    _, path, cand, score = min(moves, key=lambda m: m[0])
    current[path], current_dense[path], fit = cand, cand.dense(), score
    history.append((path, cand.bits, cand.method, fit))
  return Allocation(current, fit, evals, history)
