"""The cut of an exact top-k mask on XLA:CPU, as an XLA FFI custom call.

``cut(values, kept)`` is ``ops.topk._cut`` over each row (the threshold bits
and the first kept tie): a radix select in C++ (``csrc/topk_cut.cc``), one
pass over a row where ``_cut`` makes 32 count passes (each materialized and
summed apart by XLA:CPU): 0.32 vs 2.6 ms on a 235,200-value layer here.
``ops.topk`` uses it in programs lowered for CPU when it is available
(compiled on first use with ``$CXX``, else ``g++``, into
``$PEMN_JAX_CACHE_DIR``; see ``kernels.native``), else its own passes. Check a
machine with:

    python -m pemn_jax.kernels.topk_cut
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from pemn_jax.kernels import native

SOURCE = Path(__file__).with_name('csrc') / 'topk_cut.cc'
TARGET = 'PemnTopkCut'


@functools.cache
def _load() -> str:
  try:
    native.load(native.build(SOURCE, 'pemn_topk_cut'), [TARGET])
    return ''
  except native.Unavailable as e:
    return str(e)


def available() -> bool:
  """Whether the kernel can run here (builds it on the first call)."""
  return not _load()


def unavailable_reason() -> str:
  """'' when available, else why not."""
  return _load()


def cut(values, kept, magnitude: bool = False):
  """Each row's top-k cut.

  Args:
    values: (rows, n) float32.
    kept: (rows,) int32, each in [1, n] (clipped to it).
    magnitude: the cut of ``abs(values)`` (read from ``values``).
  Returns:
    ``(threshold, start)``, each (rows,) uint32: the ``kept``-th largest
    value's order-preserving bits, and the first position kept among the
    values equal to it (0 when all of them are kept).
  Raises:
    native.Unavailable: when ``available()`` is False.
  """
  if not available():
    raise native.Unavailable(f'the CPU top-k kernel is unavailable: {unavailable_reason()}')
  out = jax.ShapeDtypeStruct(kept.shape, jnp.uint32)
  return jax.ffi.ffi_call(TARGET, (out, out), vmap_method='sequential')(
      values.astype(jnp.float32), kept.astype(jnp.int32), magnitude=bool(magnitude))


def main():
  ok = available()
  print(f'CPU top-k kernel: {"available" if ok else "unavailable: " + unavailable_reason()}')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
