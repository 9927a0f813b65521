"""One error policy for the command-line entry points (``main``, ``ablate``,
``export``, ``evaluate``, ``evolve``, ``plot``): each starts with ``run(main)``;
and their progress lines (``Eta``).

Exit status: 0 done, or stopped cleanly with its state saved (a signal,
``stop_at_step``); 2 a bad config, flag, file, dataset, checkpoint or workdir,
or a filesystem fault (a full disk, a read-only directory), one line on
stderr naming it (earlier checkpoints are kept); 3 training diverged (the last
finite checkpoint is kept); 4 another process of a multi-process job was lost (its
log says why; the checkpoints are kept).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import time

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


def configure_cpu(config) -> None:
  """Sets XLA:CPU up for a run of ``config`` before JAX's backend starts
  (``pemn_jax.kernels.cpu_tuning.configure``, from the estimate of one
  step's activations; ``config`` None: no estimate). A bad
  ``PEMN_JAX_HOST_MEMORY`` exits 2 with its message."""
  from pemn_jax.kernels import cpu_tuning
  from pemn_jax.train.run import activation_bytes
  try:
    cpu_tuning.configure(None if config is None else activation_bytes(config))
  except ValueError as e:
    fail(e)


class Eta:
  """A progress line with an ETA for a long task, for ``say``: at most one
  every ``every`` seconds, so a task shorter than that prints nothing.

  Call it as ``eta(done, total)`` (any unit: weights, steps); ``done == 0``
  (re)starts the clock.
  """

  def __init__(self, say, what: str, unit: str = '', every: float = 5.0,
               clock=time.monotonic):
    self.say, self.what, self.unit, self.every, self.clock = say, what, unit, every, clock
    self.t0 = self.last = clock()

  def __call__(self, done: int, total: int):
    now = self.clock()
    if done == 0:
      self.t0 = self.last = now
    if now - self.last < self.every or not 0 < done < total:
      return
    self.last, spent = now, now - self.t0
    self.say(f'{self.what}: {done:,}/{total:,}{self.unit} ({100 * done / total:.0f}%), '
             f'{spent:.0f}s, eta {spent * (total - done) / done:.0f}s')


def out_of_memory(e: BaseException) -> bool:
  """Whether ``e`` is XLA failing to allocate (host or device memory)."""
  text = str(e)
  return (type(e).__name__ in ('JaxRuntimeError', 'XlaRuntimeError')
          and ('RESOURCE_EXHAUSTED' in text or 'Out of memory' in text))


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
  except OSError as e:  # a filesystem fault the code did not name itself: still one line
    from pemn_jax.train.workdir import fs_error
    fail(fs_error('a file could not be read or written', e))
  except DivergenceError as e:
    fail(e, DIVERGED)
  except Exception as e:
    if out_of_memory(e):
      first = str(e).strip().split('\n')[0][:300]
      fail(f'out of memory ({first}). Saved checkpoints and files are kept. Lower the batch '
           "size or the model's size (or a sweep's number of variants), or run where there "
           'is more memory (more devices, a sharded state)')
    if not lost_peer(e):
      raise
    import jax
    first = str(e).strip().split('\n')[0][:300]
    print(f'error: process {jax.process_index()} lost contact with another process of this '
          f'{jax.process_count()}-process job ({first}). Another process most likely died: its '
          'log says why. The checkpoints in the workdir are kept; run the same command again to '
          'resume from the last one.', file=sys.stderr, flush=True)
    os._exit(LOST_PEER)  # the runtime's shutdown would wait for the dead process


def run(main):
  """``absl.app.run(main)`` with flag and config-file mistakes (an unknown
  flag or config key, a bad value, a missing config file, a bad config
  argument) answered by one line and exit 2, not a traceback; ``--import``
  modules imported first; library INFO logs (orbax, TFDS, JAX) hidden unless
  ``--verbosity=0`` is given."""
  from absl import app, flags
  if 'import' not in flags.FLAGS:
    flags.DEFINE_multi_string('import', [], 'Your module (dotted name or .py file) that '
                              'registers models or methods; repeatable (training: recorded as '
                              'config.imports, so export/evolve of the run import it too).')

  def checked(argv):
    from absl import logging
    if not flags.FLAGS['verbosity'].present:  # quiet by default: --verbosity=0 shows INFO logs
      logging.set_verbosity(logging.WARNING)
      # and orbax's tracebacks of a failed background save: the error line names it
      logging.get_absl_logger().addFilter(lambda r: '/orbax/' not in (r.pathname or ''))
    try:
      if flags.FLAGS['import'].value:
        from pemn_jax.config import import_modules
        import_modules(flags.FLAGS['import'].value)
      return main(argv)
    except app.UsageError as e:  # (absl would exit 1 with its usage text)
      fail(e)
    except KeyboardInterrupt:  # (training and evolve save and exit 0 on their own)
      fail('interrupted (Ctrl-C) before it finished; nothing partial was written', 130)
    except Exception as e:
      from pemn_jax.config import ConfigError
      if isinstance(e, ConfigError):  # (--import's, before main's own policy applies)
        fail(e)
      raise

  app.run(checked, flags_parser=parse_flags)


def parse_flags(argv):
  """Parses ``argv`` into absl's flags; a mistake exits 2 naming it."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_message(e, argv))
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' overrides
    fail(_override_message(e, argv))
  config = flags.FLAGS['config'] if 'config' in flags.FLAGS else None
  if type(getattr(config, 'value', None)).__name__ == '_ErrorConfig':  # ml_collections' IOError
    fail(missing_config_file(config.config_filename))
  return rest


def close_match(word, choices, shown=str) -> str:
  """`` (did you mean X?)`` for the choice closest to ``word`` (X: ``shown``
  of it), or ``''``. Every "did you mean" of the CLIs and configs."""
  found = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
  return f' (did you mean {shown(found[0])}?)' if found else ''


def _config_keys(argv) -> list[str]:
  """The keys (dotted) of the config file ``argv`` names, for suggestions."""
  from pemn_jax.sweep.spec import load_config
  spec = next((b for a, b in zip(argv, argv[1:], strict=False) if a == '--config'),
              next((a[9:] for a in argv if a.startswith('--config=')), None))
  try:
    return _flat_keys(load_config(spec).to_dict()) if spec else []
  except Exception:  # noqa: BLE001 - a config that does not load: no suggestions
    return []


def _flat_keys(d, prefix='') -> list[str]:
  out = []
  for k, v in d.items():
    out.append(prefix + k)
    if isinstance(v, dict):
      out += _flat_keys(v, f'{prefix}{k}.')
  return out


def _flag_message(e, argv) -> str:
  from absl import flags
  text = str(e)
  if isinstance(e, flags.UnrecognizedFlagError):
    name = getattr(e, 'flagname', '') or text
    if name.startswith('config.'):
      return _no_such_key(f'--{name}', argv)
    return f'unknown flag --{name}' + close_match(name, list(flags.FLAGS), '--{}'.format)
  if 'Error whilst parsing config file' in text:
    head = text.split(': Error whilst parsing', 1)[0]  # 'flag --config=FILE:ARGS'
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1].strip()
    last = re.sub(r'^[\w.]*(Error|Exception)\w*: ', '', last)
    return f'{head.replace("flag ", "")}: {last}'
  return text.replace('flag --', '--', 1).splitlines()[0]


def _override_message(e, argv) -> str:
  while isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0],
                                                                              Exception):
    e = e.args[0]  # ml_collections wraps the KeyError of a missing key
  first = (str(e.args[0]) if e.args else str(e)).split('\n')[0].strip('\'"')
  bad = [a.split('=')[0] for a in argv if a.startswith('--config.')
         and re.split(r'[.=]', a[2:]).count(first)]
  if not bad:
    return f'a --config.* flag: {type(e).__name__}: {first}'
  return _no_such_key(bad[0], argv)


def _no_such_key(flag: str, argv) -> str:
  """``--config.KEY: no such config key (did you mean --config.NEAR?)``."""
  return (f'{flag}: no such config key' +
          close_match(flag[len('--config.'):], _config_keys(argv), '--config.{}'.format))


def missing_config_file(spec: str) -> str:
  """The message for a ``--config`` file that does not exist (main and
  ablate alike), with the closest file of its folder."""
  path = spec.split(':', 1)[0]
  near = ''
  folder = os.path.dirname(path) or '.'
  if os.path.isdir(folder):
    near = close_match(os.path.basename(path), os.listdir(folder),
                       lambda f: os.path.join(os.path.dirname(path), f))
  return f'--config={spec}: no such config file{near}'
