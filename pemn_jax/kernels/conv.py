"""Convolutions on XLA:CPU at PyTorch's speed; XLA's own elsewhere.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated``
(Flax's ``nn.Conv`` / ``nnx.Conv`` take it as ``conv_general_dilated=``). On
the CPU backend, for the plain 2-D case (NHWC, HWIO, no dilation or groups,
float32): 1x1 kernels without padding are one matrix product
(``pointwise``); k x k kernels are oneDNN's forward and gradients
(``pemn_jax.kernels.dnnl_conv``: where installed, on a one-device process),
else XLA's forward and input gradient with a custom kernel gradient
(``kernel_grad``: shifted matrix products over ~1 MiB batch chunks; XLA:CPU's
own runs at a tenth of the matmul rate). Everything else calls
``lax.conv_general_dilated``; gradients equal XLA's up to the order of float
additions (tests/kernels/). Measurements: docs/cpu_speed.md.

``impl``: ``'auto'`` (the above), ``'xla'`` (always XLA's), ``'cpu'`` (the
XLA-based custom gradient on any backend), ``'onednn'`` (an error where
unavailable). Calls that name none use ``default_impl()``: ``forced``'s,
else the environment variable ``PEMN_JAX_CONV``, else ``'auto'``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pemn_jax.kernels import dnnl_conv

IMPLS = ('auto', 'xla', 'cpu', 'onednn')
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))
DEFAULT_IMPL = os.environ.get('PEMN_JAX_CONV', 'auto')
_FORCED = contextvars.ContextVar('pemn_jax_conv_impl', default=None)


@contextlib.contextmanager
def forced(impl: str):
  """Within: convolutions that name no ``impl`` use this one (``'xla'``:
  trace a model's shapes without asking which backend will run it)."""
  token = _FORCED.set(impl)
  try:
    yield
  finally:
    _FORCED.reset(token)


def default_impl() -> str:
  """The impl of calls that name none: ``forced``'s, else ``DEFAULT_IMPL``."""
  return _FORCED.get() or DEFAULT_IMPL
CHUNK_BYTES = 1 << 20  # input bytes per batch chunk of the kernel gradient


def _pads(padding, lhs_shape, rhs_shape, strides) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _chunk(n: int, example_bytes: int) -> int:
  """The largest divisor of n whose chunk of examples fits CHUNK_BYTES, and
  at least gcd(n, 8) (chunks then split evenly over up to 8 data shards)."""
  best = math.gcd(n, 8)
  for d in range(best, n + 1):
    if n % d == 0 and d % best == 0 and d * example_bytes <= CHUNK_BYTES:
      best = d
  return best


def kernel_grad(x, g, kernel_hw: tuple[int, int], strides: tuple[int, int],
                pads: tuple[tuple[int, int], ...]):
  """d(conv(x, w)) / dw contracted with the output gradient ``g``.

  Args:
    x: input, (N, H, W, C).
    g: output gradient, (N, Ho, Wo, K).
    kernel_hw: (kh, kw).
    strides: (sh, sw).
    pads: ((lo, hi), (lo, hi)) explicit padding of H and W.
  Returns:
    (kh, kw, C, K) float32: sum over n, h, w of
    ``xpad[n, h*sh + i, w*sw + j, c] * g[n, h, w, k]``.
  """
  _, _, _, c = x.shape
  _, ho, wo, k = g.shape
  kh, kw = kernel_hw
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  # Rows/columns past the last window are never read; negative padding crops.
  xp = xp[:, :(ho - 1) * sh + kh, :(wo - 1) * sw + kw, :]
  if xp.shape[1] < (ho - 1) * sh + kh or xp.shape[2] < (wo - 1) * sw + kw:
    raise ValueError(f'kernel_grad: padded input {xp.shape} too small for output {g.shape}')

  def chunk(xc, gc):
    gc = gc.reshape(-1, k)
    parts = []
    for i in range(kh):
      for jj in range(kw):
        win = lax.slice(xc, (0, i, jj, 0),
                        (xc.shape[0], i + (ho - 1) * sh + 1, jj + (wo - 1) * sw + 1, c),
                        (1, sh, sw, 1))
        parts.append(jnp.dot(win.reshape(-1, c).T, gc, preferred_element_type=jnp.float32))
    return jnp.stack(parts)

  return _sum_over_chunks(xp, g, chunk, (kh * kw, c, k)).reshape(kh, kw, c, k)


def _sum_over_chunks(xp, g, chunk, shape):
  """sum of ``chunk(xp[examples], g[examples])`` (float32, ``shape``) over
  chunks of ~CHUNK_BYTES of examples, in a ``fori_loop``.

  Chunk j holds examples j, j + n/nb, j + 2n/nb, ...: the batch's leading
  (data-sharded) dimension stays inside every chunk, so on a sharded batch
  each device reduces its own examples (no all-gather of activations); the
  chunk is sliced out in the loop (no transposed copy of x or g).
  """
  n = xp.shape[0]
  nb = _chunk(n, math.prod(xp.shape[1:]) * xp.dtype.itemsize)
  m = n // nb
  xs = xp.reshape(nb, m, *xp.shape[1:])
  gs = g.reshape(nb, m, *g.shape[1:])

  def body(j, acc):
    return acc + chunk(lax.dynamic_index_in_dim(xs, j, axis=1, keepdims=False),
                       lax.dynamic_index_in_dim(gs, j, axis=1, keepdims=False))

  return lax.fori_loop(0, m, body, jnp.zeros(shape, jnp.float32))


def depthwise_kernel_grad(x, g, kernel_hw: tuple[int, int],
                          pads: tuple[tuple[int, int], ...]):
  """The kernel gradient of a stride-1 depthwise convolution.

  Args:
    x: input, (N, H, W, C).
    g: output gradient, (N, Ho, Wo, C).
    kernel_hw: (kh, kw).
    pads: ((lo, hi), (lo, hi)) explicit padding of H and W.
  Returns:
    (kh, kw, C) float32: sum over n, h, w of ``xpad[n, h + i, w + j, c] * g[n, h, w, c]``,
    reduced chunk by chunk of examples (as ``kernel_grad``): reduced over the
    whole batch at once, XLA:CPU writes each of the kh*kw shifted windows out
    in full first (ConvMixer-256/8: 0.65 of a 1.8 s step).
  """
  c = x.shape[3]
  _, ho, wo, _ = g.shape
  kh, kw = kernel_hw
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))[:, :ho + kh - 1, :wo + kw - 1, :]

  def chunk(xc, gc):
    return jnp.stack([
        jnp.sum(xc[:, i:i + ho, jj:jj + wo, :] * gc, axis=(0, 1, 2), dtype=jnp.float32)
        for i in range(kh) for jj in range(kw)])

  return _sum_over_chunks(xp, g, chunk, (kh * kw, c)).reshape(kh, kw, c)


def _shifted_sum(x, kernel, pads):
  """sum over (dy, dx) of the padded x shifted by (dy, dx), times kernel[dy, dx]."""
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  out = None
  for dy in range(kh):
    for dx in range(kw):
      term = xp[:, dy:dy + h, dx:dx + w, :] * kernel[dy, dx, 0, :]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def shifted_depthwise_conv(x, kernel):
  """'SAME' stride-1 depthwise conv as k*k shifted multiply-adds (NHWC,
  kernel (kh, kw, 1, C)). On XLA:CPU this is several times faster than
  ``lax.conv_general_dilated(feature_group_count=C)``, forward and backward
  (oneDNN's, ``depthwise_conv``, is faster still).

  Its input gradient is the same sum over the output gradient with the kernel
  flipped (autodiff's would pad each of the k*k slices' gradients to full
  size and add them: ConvMixer-256/8's step spent 0.56 of its 1.93 s there).
  """
  return _shifted_sum(x, kernel, _pads('SAME', x.shape, kernel.shape, (1, 1)))


def _shifted_fwd(x, kernel):
  return shifted_depthwise_conv(x, kernel), (x, kernel)


def _shifted_bwd(res, g):
  x, kernel = res
  (pt, pb), (pl, pr) = pads = _pads('SAME', x.shape, kernel.shape, (1, 1))
  kh, kw = kernel.shape[:2]
  dx = _shifted_sum(g, kernel[::-1, ::-1], ((pb, pt), (pr, pl)))
  dk = depthwise_kernel_grad(x, g, (kh, kw), pads)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


shifted_depthwise_conv.defvjp(_shifted_fwd, _shifted_bwd)


def depthwise_conv(x, kernel, impl: str | None = None):
  """'SAME' stride-1 depthwise convolution on CPU (NHWC, kernel (kh, kw, 1, C)):
  oneDNN's where ``impl`` (default: ``default_impl()``) takes oneDNN and x is
  float32, else ``shifted_depthwise_conv``. The same function as
  ``lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
  feature_group_count=C)``; ConvMixer-256/8's layer (batch 128, 16x16x256, 5x5)
  takes 31 ms forward and backward in oneDNN, 81-84 ms shifted."""
  impl = default_impl() if impl is None else impl
  if x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and _use_onednn(impl):
    return dnnl_conv.conv(x, kernel, (1, 1), _pads('SAME', x.shape, kernel.shape, (1, 1)),
                          x.shape[-1])
  return shifted_depthwise_conv(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _conv_fwd(x, w, strides, pads):
  return _conv_nhwc(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x: lax.conv_general_dilated(x, w, strides, pads,
                                                        dimension_numbers=_NHWC), x)
  (dx,) = vjp_x(g)
  dw = kernel_grad(x, g, w.shape[:2], strides, pads).astype(w.dtype)
  return dx, dw


_conv_nhwc.defvjp(_conv_fwd, _conv_bwd)


def pointwise(x, w, strides):
  """A 1x1 convolution without padding as one matrix product (its
  gradients are matrix products too; XLA:CPU's 1x1 convolution gradients are
  2-3x slower)."""
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw, :]
  n, h, w_, c = x.shape
  y = jnp.dot(x.reshape(-1, c), w.reshape(c, -1), preferred_element_type=jnp.float32)
  return y.reshape(n, h, w_, -1).astype(x.dtype)


def _is_nhwc(dimension_numbers, lhs_shape, rhs_shape) -> bool:
  if len(lhs_shape) != 4 or len(rhs_shape) != 4:
    return False
  try:
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  except (TypeError, ValueError):
    return False
  return tuple(dn) == tuple(_NHWC)


def fast_path(lhs, rhs, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, batch_group_count=1, preferred_element_type=None,
              impl: str | None = None) -> bool:
  """Whether ``conv_general_dilated`` has a CPU kernel for this convolution
  (the plain NHWC/HWIO float32 case, and an ``impl`` other than ``'xla'``)."""
  impl = default_impl() if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f'conv impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'xla':
    return False
  ones = lambda d: d is None or all(int(v) == 1 for v in d)  # noqa: E731
  return (ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
          and batch_group_count == 1 and preferred_element_type is None
          and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape))


def _use_onednn(impl: str) -> bool:
  """oneDNN for a k x k convolution in the CPU kernels: asked for, or 'auto'
  in a one-device process where it is available (XLA cannot partition a
  custom call: on a sharded batch it would gather the batch to every device)."""
  if impl == 'onednn':
    return True
  return impl == 'auto' and jax.device_count() == 1 and dnnl_conv.available()


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None,
                         impl: str | None = None, out_sharding=None):
  """``lax.conv_general_dilated`` with CPU kernels where they apply.

  With ``impl='auto'`` the kernel is chosen per platform when the step is
  lowered (``lax.platform_dependent``): the CPU program gets the CPU kernels,
  a TPU or GPU program (lowered or exported from any host) XLA's own
  convolution, never a CPU custom call.

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
    dimension_numbers, feature_group_count, batch_group_count, precision,
    preferred_element_type: as ``lax.conv_general_dilated``.
    impl: ``'auto'``, ``'xla'``, ``'cpu'`` or ``'onednn'`` (the last two on
      any platform); None: ``default_impl()`` (see the module docstring).
    out_sharding: as ``lax.conv_general_dilated`` (given: XLA's path).
  Returns:
    The convolution, the same function as ``lax.conv_general_dilated``.
  """
  impl = default_impl() if impl is None else impl
  kwargs = {} if out_sharding is None else {'out_sharding': out_sharding}

  def xla_conv(lhs, rhs):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type,
                                    **kwargs)

  if out_sharding is not None or not fast_path(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, preferred_element_type, impl):
    return xla_conv(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  pads = _pads(padding, lhs.shape, rhs.shape, strides)

  def cpu_conv(lhs, rhs):
    if rhs.shape[:2] == (1, 1) and not any(v for p in pads for v in p):
      return pointwise(lhs, rhs, strides)
    if all(v >= 0 for p in pads for v in p):
      if _use_onednn(impl):
        return dnnl_conv.conv(lhs, rhs, strides, pads)
      return _conv_nhwc(lhs, rhs, strides, pads)
    return xla_conv(lhs, rhs)

  if impl == 'auto':
    return lax.platform_dependent(lhs, rhs, cpu=cpu_conv, default=xla_conv)
  return cpu_conv(lhs, rhs)
