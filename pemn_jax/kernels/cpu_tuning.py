"""XLA:CPU set-up for training: a memory-lean schedule, a step's memory kept.

``configure()``, before JAX starts its CPU backend (``python -m
pemn_jax.main`` and the benchmarks call it first thing; XLA reads its flags
and JAX its dispatch mode then):

1. ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (added to
   ``XLA_FLAGS`` unless set): XLA's default CPU schedule keeps 3.46 GB of
   temporaries alive for a ConvMixer-256/8 PEMN step at batch 128, the
   memory-minimizing one 2.89 GB (9.6 and 2.7 GB while the depthwise
   convolutions' input gradient was autodiff's k*k padded slices);
2. for steps with large temporaries, ``keep()``: XLA:CPU allocates a step's
   temporaries as one block on every execution (292 MB for ResNet-20 at
   batch 128). Dispatched asynchronously, that happens on a worker thread,
   whose glibc arena cannot hold a block over 64 MiB: glibc maps it afresh
   and unmaps it after the step, so every step faults in and zeroes it
   (74,700 page faults a ResNet-20 step). ``keep()`` runs single-device
   computations in the calling thread (``jax_cpu_enable_async_dispatch``
   off; the main thread's arena has no size limit) and asks glibc never to
   map large blocks apart nor give freed memory back (``mallopt``), so each
   step reuses the last one's pages: ResNet-20 0.25-0.29 -> 0.19-0.22 s a
   step, ConvMixer-256/8 PEMN 2.65 -> 2.12 s. Resident memory then stays at
   its peak. It is not free for small steps: without asynchronous dispatch
   the Python work of a call no longer overlaps the previous step (the
   quickstart MLP's trainer step 2.76 -> 3.10 ms), hence ``keep`` only above
   ``KEEP_ABOVE`` bytes of activations per step (the caller's estimate,
   e.g. ``pemn_jax.train.run.activation_bytes``).

``PEMN_JAX_HOST_MEMORY=keep`` / ``release`` forces 2. on / off (``auto``, the
default, decides by the estimate). Nothing is done unless the process will
run on CPU (``JAX_PLATFORMS`` unset or ``cpu``, no GPU/TPU plugin); ``keep``
needs glibc; ``PEMN_JAX_CPU_TUNING=off`` turns it all off. Measurements:
docs/cpu_speed.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_ABOVE = 64 << 20  # bytes of activations per step: a block a worker's arena cannot keep
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')
_done: str | None = None


def _cpu_only() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', os.environ.get('JAX_PLATFORM_NAME', ''))
  if platforms:
    return platforms.strip().lower() == 'cpu'
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def configure(step_bytes: int | None = None) -> dict[str, str]:
  """The CPU set-up of a training process (call before JAX's first computation).

  Args:
    step_bytes: an estimate of the activations of one training step (e.g.
      ``pemn_jax.train.run.activation_bytes(config)``); ``keep()`` is applied
      above ``KEEP_ABOVE`` unless ``PEMN_JAX_HOST_MEMORY`` says otherwise.
      None: unknown (not kept unless asked).
  Returns:
    ``{'scheduler': ..., 'host_memory': ...}``: what was done or why not.
  Raises:
    ValueError: ``PEMN_JAX_HOST_MEMORY`` is none of auto, keep, release.
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
  wanted = os.environ.get('PEMN_JAX_HOST_MEMORY', 'auto').strip().lower() or 'auto'
  wanted = {'retain': 'keep'}.get(wanted, wanted)  # its name before 2026-12-03
  if wanted not in ('auto', 'keep', 'release'):
    raise ValueError(f'PEMN_JAX_HOST_MEMORY={wanted!r}: expected auto, keep or release')
  if wanted == 'auto':
    wanted = 'keep' if step_bytes is not None and step_bytes > KEEP_ABOVE else 'release'
  return {'scheduler': scheduler, 'host_memory': keep() if wanted == 'keep' else 'released'}


def keep() -> str:
  """Keeps a step's memory for the next step (see the module docstring).

  Returns:
    What was done: ``'kept'``, or why not (``'not cpu'``, ``'not glibc'``,
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
      ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)  # -1: SIZE_MAX, never trim
      if ok:
        import jax
        jax.config.update('jax_cpu_enable_async_dispatch', False)
      _done = 'kept' if ok else 'not glibc'
  return _done


def _backend_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, '_backends', {}))
  except ImportError:  # private API moved: assume not started
    return False
