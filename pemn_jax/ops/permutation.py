"""Stateless random permutations of ``[0, n)`` for any n, computed inside jit.

A keyed Feistel network permutes ``[0, 2**m)`` with ``2**(m-1) < n <= 2**m``;
cycle-walking (re-applying it to the values that land outside ``[0, n)``)
restricts it to a bijection of ``[0, n)``. Evaluating the permutation at index
``j`` needs only ``(seed, leaf id, j)``: no index table is ever stored.
``permute_segments`` evaluates one independent permutation per leaf for all
leaves at once (one fused op, one loop).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax.ops.hashing import as_seed, lowbias32, mix, path_id
from pemn_jax.ops.segments import Segments

_U32 = jnp.uint32
DEFAULT_ROUNDS = 6


def _domain_bits(n):
  """m = ceil(log2 n) (>= 1), split into left/right Feistel widths."""
  n = np.asarray(n, np.int64)
  if (n < 1).any() or (n >= 2**32).any():
    raise ValueError(f'permutation domain sizes must be in [1, 2**32), got {n}')
  m = np.maximum(1, np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64))
  m = np.where((np.int64(1) << m) < n, m + 1, m)  # guard float rounding
  return m // 2, m - m // 2


def _feistel(x, round_keys, wl, wr):
  """An unbalanced Feistel network over ``[0, 2**(wl+wr))``; ``wl``/``wr`` may
  be per-element arrays."""
  one = _U32(1)
  left = x >> wr
  right = x & ((one << wr) - one)
  for k in round_keys:
    f = lowbias32(right * _U32(0x9E3779B1) + k)
    # (L, R) -> (R, L ^ F(R)); the widths swap each round.
    left, right = right, (left ^ f) & ((one << wl) - one)
    wl, wr = wr, wl
  return (left << wr) | right


def _feistel_inverse(y, round_keys, wl, wr):
  """``_feistel``'s inverse: the rounds undone in reverse order."""
  one = _U32(1)
  if len(round_keys) % 2:  # the widths after the last round
    wl, wr = wr, wl
  left = y >> wr
  right = y & ((one << wr) - one)
  for k in reversed(round_keys):
    f = lowbias32(left * _U32(0x9E3779B1) + k)
    # (L', R') = (R, L ^ F(R)) -> (L, R) = (R' ^ F(L'), L')
    left, right = (right ^ f) & ((one << wr) - one), left
    wl, wr = wr, wl
  return (left << wr) | right


def _cycle_walk(j, n, round_keys, wl, wr, inverse=False):
  def step(x):
    return (_feistel_inverse if inverse else _feistel)(x, round_keys, wl, wr)
  # The domain is < 2n, so the expected walk is < 2 steps and the loop ends
  # after O(log N) passes.
  return jax.lax.while_loop(lambda x: jnp.any(x >= n),
                            lambda x: jnp.where(x >= n, step(x), x), step(j))


def _leaf_id(leaf) -> int:
  return path_id(leaf) if isinstance(leaf, str) else int(leaf) & 0xFFFFFFFF


def permute_indices(j, n: int, seed, leaf: str | int = 0, rounds: int = DEFAULT_ROUNDS,
                    inverse: bool = False):
  """Returns pi(j) for a seed- and leaf-keyed bijection pi of ``[0, n)``.

  Args:
    j: integer array of indices in ``[0, n)`` (any shape).
    n: domain size (static Python int, 1 <= n < 2**32).
    seed: uint32 scalar (array or int).
    leaf: leaf path (str) or id; different leaves get independent permutations.
    rounds: Feistel rounds (any >= 1 gives a bijection; 6 mixes well).
    inverse: pi^-1(j) instead (the Feistel rounds and the cycle walk undone:
      as cheap as pi itself).
  """
  wl, wr = _domain_bits(n)
  keys = [mix(as_seed(seed), _leaf_id(leaf), 0xFE15, r) for r in range(rounds)]
  return _cycle_walk(jnp.asarray(j, _U32), _U32(n), keys, _U32(int(wl)), _U32(int(wr)),
                     inverse)


def permute_segments(segments: Segments, leaves: Sequence[str | int], seed,
                     rounds: int = DEFAULT_ROUNDS, ids=None, inverse: bool = False):
  """For each segment i, ``pi_i(local index)``: the same values as
  ``permute_indices(arange(n_i), n_i, seed, leaves[i])``, for all segments in
  one flat uint32 array of length ``segments.total`` (``inverse``: pi_i^-1)."""
  if len(leaves) != len(segments):
    raise ValueError(f'{len(leaves)} leaf ids for {len(segments)} segments')
  ids = segments.ids() if ids is None else ids
  wl, wr = _domain_bits(segments.sizes)
  lids = segments.per_segment([_leaf_id(x) for x in leaves], _U32)
  seed = as_seed(seed)
  keys = [mix(seed, lids, 0xFE15, r)[ids] for r in range(rounds)]
  n = segments.per_segment(segments.sizes, _U32)[ids]
  return _cycle_walk(segments.local(ids), n, keys, segments.per_segment(wl, _U32)[ids],
                     segments.per_segment(wr, _U32)[ids], inverse)
