"""oneDNN convolutions on XLA:CPU, called through XLA's FFI.

The plain 2-D case (NHWC input, HWIO kernel, float32, explicit non-negative
padding): forward, input gradient and kernel gradient as a ``custom_vjp``
whose three parts are XLA FFI custom calls (``csrc/dnnl_conv.cc``); XLA:CPU's
own (Eigen) take 1.4-3x as long on the ResNet shapes. Optional: it needs the
``cpu`` extra (``pip install -e '.[cpu]'``: oneDNN's Linux x86-64 wheels) and
a C++17 compiler (``$CXX``, else ``g++``); the handlers are compiled on first
use into ``$PEMN_JAX_CACHE_DIR`` (default ``~/.cache/pemn_jax``), keyed by
source, jaxlib and oneDNN. Without them ``available()`` is False and says why
(``unavailable_reason()``). Check a machine with:

    python -m pemn_jax.kernels.dnnl_conv
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax.kernels import native

SOURCE = Path(__file__).with_name('csrc') / 'dnnl_conv.cc'
RUNTIME, HEADERS = 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'
TARGETS = {'fwd': 'PemnDnnlConvFwd', 'bwd_data': 'PemnDnnlConvBwdData',
           'bwd_weights': 'PemnDnnlConvBwdWeights'}


Unavailable = native.Unavailable


def _dist_file(dist: str, suffix: str) -> Path:
  try:
    files = importlib.metadata.distribution(dist).files or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f"the {dist} package is not installed (pip install -e '.[cpu]')") from None
  for f in files:
    if str(f).endswith(suffix):
      return Path(f.locate()).resolve()
  raise Unavailable(f'the {dist} package has no file ending in {suffix}')


def build() -> Path:
  """The compiled handler library, compiled first if not cached.

  Returns:
    Its path.
  Raises:
    Unavailable: oneDNN, its headers or a compiler is missing, or the
      compilation failed (the compiler's message included).
  """
  lib = _dist_file(RUNTIME, 'libdnnl.so.3')
  header = _dist_file(HEADERS, 'include/dnnl.hpp')
  return native.build(SOURCE, 'pemn_dnnl_conv',
                      (f'-I{header.parent}', f'-L{lib.parent}', '-l:libdnnl.so.3', '-fopenmp',
                       f'-Wl,-rpath,{lib.parent}'), (str(lib), str(lib.stat().st_size)))


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  try:
    path = build()
    # oneDNN's OpenMP threads sleep, not spin, between calls: spinning, they
    # take the cores from XLA's own threads running the ops in between (and
    # from another OpenMP runtime in the process, e.g. PyTorch's). Read once,
    # when libgomp loads; a value the user set is kept.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    lib = native.load(path, TARGETS.values())
    lib.PemnDnnlVersion.restype = ctypes.c_char_p
    return lib, ''
  except Unavailable as e:
    if _installed():  # installed but unusable: worth one warning (not installed: an option off)
      warnings.warn(f'pemn_jax: oneDNN convolutions are installed but unusable ({e}); '
                    'convolutions use the XLA-based path', RuntimeWarning, stacklevel=3)
    return None, str(e)


def _installed() -> bool:
  try:
    importlib.metadata.distribution(HEADERS)
    importlib.metadata.distribution(RUNTIME)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def available() -> bool:
  """Whether oneDNN convolutions can run here (builds them on the first call)."""
  return _load()[0] is not None


def unavailable_reason() -> str:
  """'' when available, else why not."""
  return _load()[1]


def version() -> str:
  """The oneDNN version the handlers run on ('' when unavailable)."""
  lib, _ = _load()
  return lib.PemnDnnlVersion().decode() if lib is not None else ''


def _call(target: str, shape, a, b, strides, pads, groups):
  (pt, pb), (pl, pr) = pads
  fn = jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(shape, jnp.float32),
                        vmap_method='sequential')
  i64 = np.int64
  return fn(a, b, sh=i64(strides[0]), sw=i64(strides[1]), pt=i64(pt), pb=i64(pb), pl=i64(pl),
            pr=i64(pr), g=i64(groups))


def out_shape(x_shape, w_shape, strides, pads) -> tuple[int, int, int, int]:
  n, h, w, _ = x_shape
  kh, kw, _, k = w_shape
  return (n, (h + sum(pads[0]) - kh) // strides[0] + 1,
          (w + sum(pads[1]) - kw) // strides[1] + 1, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, w, strides: tuple[int, int], pads: tuple[tuple[int, int], tuple[int, int]],
         groups: int = 1):
  """A 2-D convolution by oneDNN: ``lax.conv_general_dilated(x, w, strides,
  pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)``.

  Args:
    x: (N, H, W, C) float32.
    w: (kh, kw, C / groups, K) float32.
    strides: (sh, sw).
    pads: ((top, bottom), (left, right)), each >= 0.
    groups: C and K split into this many groups (C for a depthwise convolution).
  Returns:
    (N, Ho, Wo, K) float32; differentiable (reverse mode) in ``x`` and ``w``.
  Raises:
    Unavailable: when ``available()`` is False.
  """
  return _forward(x, w, strides, pads, groups)


def _forward(x, w, strides, pads, groups):
  if not available():
    raise Unavailable(f'oneDNN convolutions are unavailable: {unavailable_reason()}')
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise TypeError(f'dnnl_conv.conv takes float32, got {x.dtype} and {w.dtype}')
  if any(p < 0 for pp in pads for p in pp):
    raise ValueError(f'dnnl_conv.conv takes non-negative padding, got {pads}')
  c, (_, _, cg, k) = x.shape[3], w.shape
  if groups < 1 or c % groups or k % groups or cg != c // groups:
    raise ValueError(f'dnnl_conv.conv: input channels {c} and kernel {w.shape} do not '
                     f'split into {groups} groups')
  return _call('fwd', out_shape(x.shape, w.shape, strides, pads), x, _ohwi(w), strides, pads,
               groups)


def _ohwi(w):
  # The handlers take the kernel as (K, kh, kw, C) and give its gradient as
  # (K, C, kh, kw): oneDNN reorders those to and from its blocked layouts far
  # faster than HWIO (docs/cpu_speed.md).
  return jnp.transpose(w, (3, 0, 1, 2))


def _conv_fwd(x, w, strides, pads, groups):
  return _forward(x, w, strides, pads, groups), (x, w)


def _conv_bwd(strides, pads, groups, res, g):
  x, w = res
  dx = _call('bwd_data', x.shape, g, _ohwi(w), strides, pads, groups)
  kh, kw, cg, k = w.shape
  dw = _call('bwd_weights', (k, cg, kh, kw), x, g, strides, pads, groups)
  return dx, jnp.transpose(dw, (2, 3, 1, 0))


conv.defvjp(_conv_fwd, _conv_bwd)


def main():
  ok = available()
  if ok:
    print(f'oneDNN convolutions: available (oneDNN {version()}, {build()})')
  else:
    print(f'oneDNN convolutions: unavailable: {unavailable_reason()}')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
