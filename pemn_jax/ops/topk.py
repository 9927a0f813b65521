"""Exact per-layer top-k masks with a straight-through gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pemn_jax.kernels import topk_cut


def num_kept(n: int, keep: float) -> int:
  """Number of elements a top-k mask keeps: ``n - int((1 - keep) * n)``.

  This is the reference rule (hidden-networks' and PEMN's ``GetSubnet`` zero
  the ``int((1 - k) * n)`` smallest scores), evaluated in Python floats as
  there, so masks are bit-exact with the reference. At least 1 (the reference
  would keep none only when ``(1 - keep) * n`` rounds up to n).
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f'mask keep fraction must be in (0, 1], got {keep}')
  return max(1, n - int((1.0 - keep) * n))


def _ordered_bits(values, magnitude: bool = False):
  """float32 -> uint32 with the same order (so integer compares sort floats);
  with ``magnitude``, the order of ``abs(values)``."""
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
  if magnitude:  # the sign bit cleared, then set: abs(values)' ordered bits
    return bits | jnp.uint32(0x80000000)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def topk_mask(values, keep: float | None = None, *, kept=None, magnitude: bool = False):
  """0/1 mask (values' dtype) with exactly ``num_kept(values.size, keep)`` (or
  ``kept``) ones at the largest entries of ``values`` (with ``magnitude``: of
  ``abs(values)``, without making that array); among equal values the later
  positions win (as the tail of a stable ascending argsort). ``kept`` may be
  a traced integer in ``[1, size]`` (e.g. a sparsity schedule).

  No sort: the k-th largest value is found by a 32-step binary search on the
  order-preserving integer bits (32 vectorized count passes). When more
  entries equal that value than are needed, a second binary search over
  positions keeps the last ones. Only elementwise ops and sums: on a sharded
  ``values`` every device works on its slice (a prefix sum would gather the
  whole array on every device). That is the program lowered for GPU/TPU.

  Lowered for CPU (chosen at lowering), the cut -- threshold and first kept
  tie -- comes from a C++ radix select (``kernels.topk_cut``, one pass over
  the values; 8x faster than the count passes, which XLA:CPU materializes
  and sums apart) in a one-device process where it can be built
  (``use_kernel()``), else from the same count passes.
  Under ``vmap`` (a sweep's stacked variants) the CPU program finds the
  variants' cuts one after another (batched count passes stream all
  variants' values, K times the bytes, out of cache: 1.3-1.5x slower than
  one by one); lowered for GPU/TPU they stay batched. The masks are then
  made from the cuts in one batched pass. The mask is piecewise constant, so
  its derivative is zero (``values`` enters under ``stop_gradient``).
  """
  n = values.size
  if isinstance(kept, jax.Array):
    m = kept
  else:
    m = num_kept(n, keep) if kept is None else int(kept)
    if not 1 <= m <= n:
      raise ValueError(f'top-k count must be in [1, {n}], got {m}')
    if m == n:
      return jnp.ones_like(values)
  return _masker(magnitude)(jax.lax.stop_gradient(values), jnp.asarray(m, jnp.int32))


@functools.cache
def _masker(magnitude: bool):
  """The mask function (custom-vmapped) ranking values, or their magnitudes."""
  order = functools.partial(_ordered_bits, magnitude=magnitude)
  cut = functools.partial(_cut, magnitude=magnitude)

  def cpu_cuts(flat, m):
    # each row's cut on CPU: the C++ kernel where it is available, else
    # ``_cut`` row after row
    if use_kernel():
      return topk_cut.cut(flat, m, magnitude=magnitude)
    return jax.lax.map(lambda a: cut(*a), (flat, m))

  @jax.custom_batching.custom_vmap
  def mask(values, m):
    flat = values.reshape(-1)
    thr, start = jax.lax.platform_dependent(
        flat, m, cpu=lambda v, k: tuple(c[0] for c in cpu_cuts(v[None], k[None])), default=cut)
    return _keep(order(flat), thr, start).astype(values.dtype).reshape(values.shape)

  @mask.def_vmap
  def variants(axis_size, in_batched, values, m):
    values, m = (x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
                 for x, b in zip((values, m), in_batched, strict=True))
    flat = values.reshape(axis_size, -1)
    # Each variant's cut (two scalars) one variant after another on CPU (the
    # kernel's rows, or a loop of count passes), batched elsewhere; the masks
    # then in one batched elementwise pass that fuses into their users (a loop
    # producing the masks themselves would write and zero-fill K fresh arrays
    # of the values' size every step).
    thr, start = jax.lax.platform_dependent(flat, m, cpu=cpu_cuts, default=jax.vmap(cut))
    keep = _keep(order(flat), thr[:, None], start[:, None])
    return keep.astype(values.dtype).reshape(values.shape), True

  return mask


def use_kernel() -> bool:
  """Whether a CPU program finds cuts with ``kernels.topk_cut``: where it is
  available, in a one-device process (XLA cannot partition a custom call: on
  scores sharded over devices it would gather each layer's to every device,
  where the count passes work slice by slice)."""
  return jax.device_count() == 1 and topk_cut.available()


def _keep(bits, thr, start):
  """The mask of a cut: above the threshold, or at it from position ``start`` on."""
  pos = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, bits.ndim - 1)
  return (bits > thr) | ((bits == thr) & (pos >= start))


def _cut(flat, m, magnitude: bool = False):
  """(threshold bits, first tie position kept) of the top-``m`` mask of ``flat``
  (with ``magnitude``: of its absolute values)."""
  n = flat.shape[0]
  bits = _ordered_bits(flat, magnitude)

  def body(i, prefix):
    cand = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(jnp.sum(bits >= cand) >= m, cand, prefix)

  thr = jax.lax.fori_loop(0, 32, body, jnp.uint32(0))  # the m-th largest value's bits
  above, tie = bits > thr, bits == thr
  need = m - jnp.sum(above)  # >= 1 ties to keep: the last ``need`` of them
  pos = jnp.arange(n, dtype=jnp.uint32)
  nb = _bits(n)

  # The largest start with >= need ties at positions >= start, one bit per
  # pass. A while loop, not a cond: it runs no pass when every tie is kept
  # (the common case), and under vmap (a sweep's variants) it still runs none
  # then, where a batched cond would evaluate both branches for every variant.
  passes = jnp.where(jnp.sum(tie) == need, 0, nb)

  def more(carry):
    return carry[0] < passes

  def body(carry):
    i, start = carry
    cand = start | (jnp.uint32(1) << (nb - 1 - i).astype(jnp.uint32))
    return i + 1, jnp.where(jnp.sum(tie & (pos >= cand)) >= need, cand, start)

  _, start = jax.lax.while_loop(more, body, (jnp.int32(0), jnp.uint32(0)))
  return thr, start  # start 0 when every tie is kept


def _bits(n: int) -> int:
  """Bits of the largest position, ``n - 1`` (at least 1)."""
  return max(1, int(n - 1).bit_length())


def straight_through(hard, soft):
  """Exactly ``hard`` in the forward pass (``soft - soft`` is exactly 0, so a
  0/1 mask stays exactly 0/1); the gradient flows to ``soft`` unchanged."""
  return jax.lax.stop_gradient(hard) + (soft - jax.lax.stop_gradient(soft))
