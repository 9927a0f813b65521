"""XLA:CPU set-up for training: a memory-lean schedule, freed memory kept.

``configure()``, before JAX starts its CPU backend (``python -m
pemn_jax.main`` and the benchmarks call it first thing; XLA reads its flags
then, and the backend's threads pick their malloc arenas when they start):

1. ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (added to
   ``XLA_FLAGS`` unless set): XLA's default CPU schedule keeps 9.6 GB of
   temporaries alive for a ConvMixer-256/8 step at batch 128, the
   memory-minimizing one 2.7 GB;
2. only with ``PEMN_JAX_HOST_MEMORY=retain``: ``retain()`` asks glibc to
   serve large blocks from one heap and never give freed memory back, so a
   step reuses the last step's pages instead of faulting in (and zeroing)
   gigabytes of fresh ``mmap``s (ConvMixer: 3.4 -> 2.6 s per step; ResNet-20
   slower, 0.47 -> 0.58 s: one arena contends; hence opt-in). Resident memory
   then stays at its peak.

Nothing is done unless the process will run on CPU (``JAX_PLATFORMS`` unset
or ``cpu``, no GPU/TPU plugin); ``retain`` needs glibc;
``PEMN_JAX_CPU_TUNING=off`` turns it all off. Measurements: docs/cpu_speed.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')
_done: str | None = None


def _cpu_only() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', os.environ.get('JAX_PLATFORM_NAME', ''))
  if platforms:
    return platforms.strip().lower() == 'cpu'
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def configure() -> dict[str, str]:
  """The memory-lean schedule for a CPU run (call before JAX's first
  computation); freed memory is kept too if ``PEMN_JAX_HOST_MEMORY=retain``.

  Returns:
    ``{'scheduler': ..., 'host_memory': ...}``: what was done or why not.
  """
  if os.environ.get('PEMN_JAX_CPU_TUNING', '').lower() == 'off':
    return {'scheduler': 'disabled', 'host_memory': 'disabled'}
  if not _cpu_only():
    return {'scheduler': 'not cpu', 'host_memory': 'not cpu'}
  if _backend_started():
    return {'scheduler': 'backend already started', 'host_memory': 'backend already started'}
  flags = os.environ.get('XLA_FLAGS', '')
  if SCHEDULER_FLAG in flags:
    scheduler = 'set by the user'
  else:
    os.environ['XLA_FLAGS'] = f'{flags} {SCHEDULER_FLAG}=false'.strip()
    scheduler = 'memory-minimizing'
  wanted = os.environ.get('PEMN_JAX_HOST_MEMORY', 'default').lower() == 'retain'
  return {'scheduler': scheduler, 'host_memory': retain() if wanted else 'default'}


def retain() -> str:
  """Makes glibc keep freed memory for reuse (see the module docstring).

  Returns:
    What was done: ``'retained'``, or why not (``'not cpu'``, ``'not glibc'``,
    ``'backend already started'``).
  """
  global _done
  if _done is not None:
    return _done
  if not _cpu_only():
    _done = 'not cpu'
  elif _backend_started():
    _done = 'backend already started'
  else:
    name = ctypes.util.find_library('c')
    try:
      libc = ctypes.CDLL(name)
      libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError, TypeError):
      _done = 'not glibc'
    else:
      ok = (libc.mallopt(_M_ARENA_MAX, 1) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)  # -1: SIZE_MAX, never trim
      _done = 'retained' if ok else 'not glibc'
  return _done


def _backend_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, '_backends', {}))
  except ImportError:  # private API moved: assume not started
    return False
