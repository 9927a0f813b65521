"""Start-up of a multi-process job on JAX's own runtime (``jax.distributed``).

``initialize`` decides whether this process is one of several and, if so,
calls ``jax.distributed.initialize`` before any JAX computation: explicitly
(``coordinator`` + ``num_processes`` + ``process_id``), auto-detected
(``distributed=None``: SLURM steps of several tasks, Open MPI, GKE TPU
workloads listing several hosts), forced (``distributed=True``: TPU VMs,
found through the metadata server) or never (``False``). SLURM with one
process per node: pass ``local_device_ids`` (``'all'``: every GPU of the node).

A process that dies stops sending heartbeats: after ``heartbeat_timeout``
seconds JAX's coordination service terminates the others; a collective that
loses its peer first fails with an error ``lost_peer`` recognizes (exit
status 4). No process waits forever. Launchers: launch/README.md.
"""

from __future__ import annotations

import os


class LaunchError(ValueError):
  """Multi-process flags that cannot be used together or are malformed."""


def detect(environ=None) -> str | None:
  """The multi-process launcher announced by the environment, or None.

  Returns:
    ``'slurm'`` (a SLURM step of several tasks), ``'ompi'``, ``'tpu'``
    (several TPU hosts listed), or None (a single process).
  """
  env = os.environ if environ is None else environ

  def count(name):
    try:
      return int(str(env.get(name, '')).split('(')[0] or 0)
    except ValueError:
      return 0

  # As JAX's own detectors: an srun step (SLURM_STEP_NODELIST is set only
  # there, not in the batch script itself), mpirun, GKE/JobSet TPU pods.
  if 'SLURM_STEP_NODELIST' in env and count('SLURM_NTASKS') > 1:
    return 'slurm'
  if count('OMPI_COMM_WORLD_SIZE') > 1:
    return 'ompi'
  for name in ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES'):
    if len([h for h in env.get(name, '').split(',') if h.strip()]) > 1:
      return 'tpu'
  return None


def local_gpu_count(environ=None) -> int:
  env = os.environ if environ is None else environ
  visible = env.get('CUDA_VISIBLE_DEVICES', '').strip()
  if visible:
    return len([d for d in visible.split(',') if d.strip()])
  try:
    return int(env.get('SLURM_GPUS_ON_NODE', '').split('(')[0])
  except ValueError:
    raise LaunchError('--local_device_ids=all: cannot tell how many GPUs this node has '
                      '(neither CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE is set); list them, '
                      'e.g. --local_device_ids=0,1,2,3') from None


def parse_device_ids(value: str | None, environ=None) -> list[int] | None:
  """``'0,1,2,3'`` -> [0, 1, 2, 3]; ``'all'`` -> every local GPU; ''/None -> None."""
  if value is None or not str(value).strip():
    return None
  if str(value).strip() == 'all':
    return list(range(local_gpu_count(environ)))
  try:
    ids = [int(x) for x in str(value).split(',')]
  except ValueError:
    raise LaunchError(f'--local_device_ids={value!r} must be a comma-separated list of '
                      'integers or "all"') from None
  if len(set(ids)) != len(ids) or min(ids) < 0:
    raise LaunchError(f'--local_device_ids={value!r}: ids must be distinct and >= 0')
  return ids


def plan(coordinator=None, num_processes=None, process_id=None, distributed=None,
         local_device_ids=None, environ=None) -> dict | None:
  """The ``jax.distributed.initialize`` arguments for these flags, or None
  when this is a single-process run.

  Raises:
    LaunchError: explicit flags given partly, or contradicting each other.
  """
  explicit = [coordinator, num_processes, process_id]
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise LaunchError('--coordinator, --num_processes and --process_id go together (or use '
                        '--distributed where the cluster announces them)')
    if distributed is False:
      raise LaunchError('--nodistributed contradicts --coordinator/--num_processes/--process_id')
    if not (isinstance(num_processes, int) and num_processes >= 1):
      raise LaunchError(f'--num_processes={num_processes} must be >= 1')
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
      raise LaunchError(f'--process_id={process_id} must be in [0, {num_processes})')
    if ':' not in str(coordinator):
      raise LaunchError(f'--coordinator={coordinator!r} must be HOST:PORT')
    args = {'coordinator_address': coordinator, 'num_processes': num_processes,
            'process_id': process_id, 'source': 'flags'}
  elif distributed is False:
    return None
  else:
    found = detect(environ)
    if found is None and not distributed:
      return None
    args = {'source': found or 'jax cluster detection'}
  ids = parse_device_ids(local_device_ids, environ)
  if ids is not None:
    args['local_device_ids'] = ids
  return args


def initialize(heartbeat_timeout: int = 100, initialization_timeout: int = 300, **flags) -> str:
  """Calls ``jax.distributed.initialize`` when ``plan(**flags)`` says so.

  Returns:
    A one-line description of what was done (for the log).
  """
  import jax

  args = plan(**flags)
  if args is None:
    return 'single process'
  source = args.pop('source')
  jax.distributed.initialize(**args, heartbeat_timeout_seconds=int(heartbeat_timeout),
                             initialization_timeout=int(initialization_timeout))
  return (f'jax.distributed ({source}): process {jax.process_index()} of '
          f'{jax.process_count()}, {jax.local_device_count()} local device(s), '
          f'{jax.device_count()} in all')


_LOST = ('gloo', 'connection reset', 'connection refused', 'heartbeat', 'unavailable',
         'coordination service', 'barrier', 'broken pipe', 'deadline_exceeded')


def lost_peer(exc: BaseException) -> bool:
  """Whether ``exc`` (raised in a multi-process job) means another process is
  gone: a failed collective or coordination-service call."""
  import jax

  if jax.process_count() == 1:
    return False
  if isinstance(exc, jax.errors.JaxRuntimeError):
    return True
  text = f'{type(exc).__name__}: {exc}'.lower()
  return any(s in text for s in _LOST)
