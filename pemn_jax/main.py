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
  from pemn_jax.cli import configure_cpu
  configure_cpu(_CONFIG.value)  # before JAX's CPU backend starts
  import jax
  import tensorflow_datasets as tfds
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  from pemn_jax.cli import exit_statuses
  from pemn_jax.train.multihost import initialize

  with exit_statuses():
    started = initialize(_HEARTBEAT.value, _INIT_TIMEOUT.value, coordinator=_COORD.value,
                         num_processes=_NPROC.value, process_id=_PID.value,
                         distributed=_DIST.value, local_device_ids=_DEVICE_IDS.value)
    if jax.process_count() > 1 and jax.process_index() == 0:
      print(started, flush=True)
    from pemn_jax.train.loop import train_and_evaluate  # after jax.distributed starts
    config = _CONFIG.value
    given = flags.FLAGS['import'].value
    if given:  # recorded with the run: its export / evolve import them too
      config.imports = ','.join([*filter(None, config.imports.split(',')), *given])
    out = train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() != 0:
    return
  if 'test_accuracy' in out:
    print(f'final: step {out["step"]} test_accuracy={out["test_accuracy"]:.4f} '
          f'best_test_accuracy={out["best_test_accuracy"]:.4f} (step {out["best_step"]}) '
          f'model_bytes={out["model_bytes"]} dense_bytes={out["dense_bytes"]} '
          + _smaller(out["dense_bytes"] / max(1, out["model_bytes"])), flush=True)
  for g in out.get('goals', []):
    print(f'{g["what"]}: {g["reached"]:.4f} (asked {g["asked"]:.4f}): '
          + ('met' if g['met'] else f'NOT met; {g["hint"]}'), flush=True)
  if out['stopped']:
    print(f'stopped at step {out["step"]} with a checkpoint; run the same command to continue',
          flush=True)


def _smaller(ratio: float) -> str:
  if ratio >= 1.05:
    return f'({ratio:.1f}x smaller)'
  return ('(no smaller than the dense params: a gated run shrinks when export --slice removes '
          'what its closed gates switch off)')


if __name__ == '__main__':
  from pemn_jax import cli
  cli.run(main)
