"""XLA:CPU set-up for training: a memory-lean schedule, freed memory kept.

``configure()`` does two things before JAX starts its CPU backend, each
measured on a ConvMixer-256/8 train step at batch 128 (2 cores; the numbers
are in docs/cpu_speed.md):

1. ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (added to
   ``XLA_FLAGS`` unless the user set it): XLA's default CPU schedule favours
   running independent ops concurrently and keeps 9.6 GB of temporaries
   alive for that step; the memory-minimizing schedule needs 2.7 GB.
2. only with ``PEMN_JAX_HOST_MEMORY=retain``: ``retain()``, below. It
   speeds up models with large temporaries (ConvMixer-256/8: 3.4 -> 2.6 s
   per step) but slows others (ResNet-20: 0.47 -> 0.58 s: one malloc arena
   for all of XLA's threads contends), so it is opt-in.


XLA:CPU allocates a step's temporaries (gigabytes for a ConvMixer at batch
128) with ``malloc`` on every execution and frees them afterwards. glibc
serves blocks that large with fresh ``mmap``s and unmaps them on free, so
every step faults every page of its temporaries in again (and the kernel
zeroes them): measured here, 2.5 million page faults and about half of the
step time of a ConvMixer-256/8 train step (``benchmarks/vs_pytorch.py``).

``retain()`` asks glibc to serve large blocks from one heap
(``M_ARENA_MAX=1``, ``M_MMAP_MAX=0``) and never to give freed memory back
(``M_TRIM_THRESHOLD`` = max): the second step reuses the first step's pages.
The process's resident memory then stays at its peak; that is the cost.

Both must run before JAX starts its CPU backend (XLA reads its flags then;
the backend's threads pick their malloc arenas when they start):
``python -m pemn_jax.main`` and the benchmarks call ``configure()`` first
thing. Nothing is done unless the process will run on CPU (``JAX_PLATFORMS``
unset or ``cpu`` and no GPU/TPU plugin installed); ``retain`` needs glibc.
``PEMN_JAX_CPU_TUNING=off`` turns all of ``configure()`` off.
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
