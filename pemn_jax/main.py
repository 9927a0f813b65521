"""Trains a model x parameterization per a config file.

    python -m pemn_jax.main --config configs/quickstart.py --workdir /tmp/run
    python -m pemn_jax.main --config configs/pemn.py:mode=rp,model=lenet5 --workdir /tmp/pemn_lenet
    python -m pemn_jax.main --config configs/pemn.py --config.optimizer.lr=0.02 --workdir /tmp/lr

Resumes automatically from --workdir's checkpoints (with the same config; see
pemn_jax.config.RESUMABLE_KEYS for what may change). Exit status: 0 done or
stopped cleanly (signal, stop_at_step), 2 bad config / data / checkpoint /
workdir, 3 training diverged (the last finite checkpoint is kept).
Multi-host: pass --coordinator HOST:PORT --num_processes N --process_id I (or
--distributed on TPU pods, where jax.distributed.initialize() finds them).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics.jsonl).')
_COORD = flags.DEFINE_string('coordinator', None, 'jax.distributed coordinator host:port.')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
_PID = flags.DEFINE_integer('process_id', None, 'This process id (multi-host).')
_DIST = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (TPU pods).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax
  import tensorflow_datasets as tfds
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  if _COORD.value or _DIST.value:
    jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
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
