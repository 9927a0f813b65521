"""Trains a model x parameterization per a config file.

    python -m pemn_jax.main --config configs/quickstart.py --workdir /tmp/run
    python -m pemn_jax.main --config configs/pemn.py:mode=rp,model=lenet5 --workdir /tmp/pemn_lenet
    python -m pemn_jax.main --config configs/pemn.py --config.optimizer.lr=0.02 --workdir /tmp/lr

Resumes automatically from --workdir's checkpoints (with the same config; see
pemn_jax.config.RESUMABLE_KEYS for what may change; a checkpoint restores onto
any mesh and process count). Exit status: 0 done or stopped cleanly (signal,
stop_at_step), 2 bad config / data / checkpoint / workdir / launch flags,
3 training diverged (the last finite checkpoint is kept), 4 lost contact with
another process of a multi-process job (its log says why; rerun to resume).

Multi-process (pemn_jax/train/multihost.py): SLURM (srun), Open MPI and GKE
TPU workloads are detected; elsewhere pass --coordinator HOST:PORT
--num_processes N --process_id I, or --distributed (TPU VMs: JAX finds the
slice). One process per node on SLURM GPUs: --local_device_ids=all. launch/
has the SLURM, TPU-VM, GKE/xpk and local scripts.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics.jsonl).')
_COORD = flags.DEFINE_string('coordinator', None, 'jax.distributed coordinator host:port.')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
_PID = flags.DEFINE_integer('process_id', None, 'This process id (multi-host).')
_DIST = flags.DEFINE_bool('distributed', None,
                          'Force (or with --nodistributed, forbid) jax.distributed.initialize(); '
                          'default: when SLURM / Open MPI / a GKE TPU workload announces several '
                          'processes, or --coordinator is given.')
_DEVICE_IDS = flags.DEFINE_string('local_device_ids', None,
                                  'Devices of this process: "0,1,2,3" or "all" (SLURM, one '
                                  'process per node).')
_HEARTBEAT = flags.DEFINE_integer('heartbeat_timeout', 100,
                                  'Seconds without heartbeats after which a process counts as '
                                  'dead and the others terminate.')
_INIT_TIMEOUT = flags.DEFINE_integer('initialization_timeout', 300,
                                     'Seconds to wait for all processes to connect.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from pemn_jax import cpu_tuning
  cpu_tuning.configure()  # before JAX's CPU backend starts; see pemn_jax/cpu_tuning.py
  import jax
  import tensorflow_datasets as tfds
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  from pemn_jax.train.multihost import LaunchError, initialize, lost_peer
  try:
    started = initialize(_HEARTBEAT.value, _INIT_TIMEOUT.value, coordinator=_COORD.value,
                         num_processes=_NPROC.value, process_id=_PID.value,
                         distributed=_DIST.value, local_device_ids=_DEVICE_IDS.value)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if jax.process_count() > 1 and jax.process_index() == 0:
    print(started, flush=True)
  from pemn_jax.config import ConfigError
  from pemn_jax.data.sources import DataError
  from pemn_jax.train.checkpoint import CheckpointError
  from pemn_jax.train.loop import DivergenceError, train_and_evaluate
  from pemn_jax.train.workdir import WorkdirError

  try:
    out = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, CheckpointError, WorkdirError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except DivergenceError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  except Exception as e:
    if not lost_peer(e):
      raise
    first = str(e).strip().split('\n')[0][:300]
    print(f'error: process {jax.process_index()} lost contact with another process of this '
          f'{jax.process_count()}-process job ({first}). Another process most likely died: its '
          'log says why. The checkpoints in the workdir are kept; run the same command again to '
          'resume from the last one.', file=sys.stderr, flush=True)
    os._exit(4)  # the runtime's shutdown would wait for the dead process
  if jax.process_index() != 0:
    return
  if 'test_accuracy' in out:
    print(f'final: step {out["step"]} test_accuracy={out["test_accuracy"]:.4f} '
          f'best_test_accuracy={out["best_test_accuracy"]:.4f} (step {out["best_step"]}) '
          f'model_bytes={out["model_bytes"]} dense_bytes={out["dense_bytes"]} '
          f'({out["dense_bytes"] / max(1, out["model_bytes"]):.1f}x smaller)', flush=True)
  if out['stopped']:
    print(f'stopped at step {out["step"]} with a checkpoint; run the same command to continue',
          flush=True)


if __name__ == '__main__':
  app.run(main)
