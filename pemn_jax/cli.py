"""One error policy for the command-line entry points (``main``, ``ablate``,
``export``, ``evaluate``, ``evolve``).

Exit status: 0 done, or stopped cleanly with its state saved (a signal,
``stop_at_step``); 2 a bad config, flag, file, dataset, checkpoint or workdir
(one line on stderr naming it); 3 training diverged (the last finite
checkpoint is kept); 4 another process of a multi-process job was lost (its
log says why; the checkpoints are kept).
"""

from __future__ import annotations

import contextlib
import os
import sys

BAD_INPUT, DIVERGED, LOST_PEER = 2, 3, 4


def user_errors() -> tuple[type[Exception], ...]:
  """The exception types that mean "bad input", not a bug (exit 2)."""
  from pemn_jax.config import ConfigError
  from pemn_jax.data.sources import DataError
  from pemn_jax.export.artifact import ArtifactError
  from pemn_jax.gating.surgery import SliceError
  from pemn_jax.train.checkpoint import CheckpointError
  from pemn_jax.train.multihost import LaunchError
  from pemn_jax.train.workdir import WorkdirError
  return (ConfigError, DataError, ArtifactError, SliceError, CheckpointError, LaunchError,
          WorkdirError)


def fail(message, status: int = BAD_INPUT):
  """Prints ``error: message`` to stderr and exits with ``status``."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


@contextlib.contextmanager
def exit_statuses(also: tuple[type[Exception], ...] = ()):
  """Maps what the body raises to this module's exit statuses.

  Args:
    also: more exception types to treat as bad input (exit 2).
  """
  from pemn_jax.train.multihost import lost_peer
  from pemn_jax.train.tracking import DivergenceError
  try:
    yield
  except user_errors() + tuple(also) as e:
    fail(e)
  except DivergenceError as e:
    fail(e, DIVERGED)
  except Exception as e:
    if not lost_peer(e):
      raise
    import jax
    first = str(e).strip().split('\n')[0][:300]
    print(f'error: process {jax.process_index()} lost contact with another process of this '
          f'{jax.process_count()}-process job ({first}). Another process most likely died: its '
          'log says why. The checkpoints in the workdir are kept; run the same command again to '
          'resume from the last one.', file=sys.stderr, flush=True)
    os._exit(LOST_PEER)  # the runtime's shutdown would wait for the dead process
