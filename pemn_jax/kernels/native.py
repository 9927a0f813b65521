"""Compiling and loading the CPU kernels' C++ handlers (XLA FFI).

Each kernel's source (``csrc/*.cc``) is compiled on first use with ``$CXX``
(else ``g++``) into ``$PEMN_JAX_CACHE_DIR`` (default ``~/.cache/pemn_jax``),
keyed by the source, jaxlib and whatever else the caller names, then loaded
and its handlers registered for the CPU platform.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax


class Unavailable(RuntimeError):
  """A CPU kernel cannot be used here (the message says why)."""


def cache_dir() -> Path:
  """Where compiled handlers are kept: ``$PEMN_JAX_CACHE_DIR``, else
  ``~/.cache/pemn_jax``."""
  return Path(os.environ.get('PEMN_JAX_CACHE_DIR') or Path.home() / '.cache' / 'pemn_jax')


def build(source: Path, name: str, flags: tuple[str, ...] = (), key: tuple[str, ...] = ()
          ) -> Path:
  """The shared library compiled from ``source``, compiled first if not cached.

  Args:
    source: the C++ file.
    name: the library's name (``lib<name>-<key>.so``).
    flags: extra compiler and linker flags (include and library paths).
    key: what else the compiled library depends on (versions, paths).
  Returns:
    Its path.
  Raises:
    Unavailable: not Linux, no compiler, an unwritable cache or a failed
      compilation (the compiler's message included).
  """
  if not sys.platform.startswith('linux'):
    raise Unavailable(f'built for Linux only (this is {sys.platform})')
  cxx = shutil.which(os.environ.get('CXX', 'g++'))
  if cxx is None:
    raise Unavailable(f'no C++ compiler ({os.environ.get("CXX", "g++")}) on PATH')
  import jaxlib
  digest = hashlib.sha256(b'\0'.join([
      source.read_bytes(), jaxlib.__version__.encode(), cxx.encode(),
      *(str(k).encode() for k in (*flags, *key))])).hexdigest()[:16]
  out = cache_dir() / 'ffi' / f'lib{name}-{digest}.so'
  if out.exists():
    return out
  # compiled under a temporary name, then renamed: processes building at once
  # each write their own file and the last rename wins (they are identical)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
    os.close(fd)
  except OSError as e:
    raise Unavailable(f'cannot write the compiled handlers to {out.parent} ({e}); set '
                      'PEMN_JAX_CACHE_DIR to a writable directory') from None
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', str(source), '-o', tmp,
         f'-I{jax.ffi.include_dir()}', *flags]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode:
      raise Unavailable(f'compiling {source.name} failed ({" ".join(cmd)}):\n{p.stderr[-2000:]}')
    os.replace(tmp, out)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise Unavailable(f'compiling {source.name} failed: {e}') from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


def load(path: Path, targets) -> ctypes.CDLL:
  """Loads a compiled library and registers its handlers (names) for CPU.

  Raises:
    Unavailable: the library cannot be loaded.
  """
  try:
    lib = ctypes.CDLL(str(path))
  except OSError as e:
    raise Unavailable(f'loading {path} failed: {e}') from None
  for name in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
  return lib
