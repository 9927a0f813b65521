"""A run's directory: created and checked writable, locked by one run at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time

import jax


class WorkdirError(RuntimeError):
  """A workdir that cannot be used (not writable, or in use by another run)."""


def prepare(workdir: str) -> str:
  """Creates ``workdir`` if needed; WorkdirError if it cannot be written."""
  if not isinstance(workdir, str) or not workdir.strip():
    raise WorkdirError(f'--workdir must be a directory path, got {workdir!r}')
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'cannot create workdir {path!r}: {e.strerror or e}') from None
  if not os.path.isdir(path):
    raise WorkdirError(f'workdir {path!r} exists and is not a directory')
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f'workdir {path!r} is not writable')
  for name in LAYOUT:  # what a run writes there must be of its kind
    check_kind(path, name)
  return path


# What a run keeps in its workdir: name -> whether it is a directory.
LAYOUT = {'checkpoints': True, 'checkpoints/rejected': True, 'tensorboard': True,
          'lock': False, 'metrics.jsonl': False}


def check_kind(workdir: str, name: str):
  """WorkdirError if ``workdir/name`` (a ``LAYOUT`` entry) exists and is not
  of the kind a run keeps there."""
  want_dir, entry = LAYOUT[name], os.path.join(os.path.abspath(workdir), name)
  if os.path.lexists(entry) and os.path.isdir(entry) != want_dir:
    raise WorkdirError(f'{entry!r} is {"not " if want_dir else ""}a directory, but a run '
                       f'keeps its {name} there as a {"directory" if want_dir else "file"}: '
                       'move it away or use another --workdir')


def fs_error(what: str, e: BaseException) -> str:
  """``what`` failed because of ``e`` (an OSError, or an error wrapping one,
  like tensorstore's): one line naming the cause and the path."""
  cause = e
  while cause is not None and not isinstance(cause, OSError):
    cause = cause.__cause__ or cause.__context__
  if cause is not None and cause.strerror:
    where = f' ({cause.filename})' if cause.filename else ''
    return f'{what}: {cause.strerror}{where}'
  text = str(e).strip().split('\n')[0]
  for known in ('No space left on device', 'Read-only file system', 'Permission denied',
                'Disk quota exceeded', 'Not a directory', 'Is a directory'):
    if known in text:  # a library's wrapper of the OS error: its cause first
      return f'{what}: {known}'
  return f'{what}: {type(e).__name__}: {text[:300]}'


class WorkdirLock:
  """An exclusive lock on ``workdir/lock`` held by process 0 while a run lives.

  ``flock`` locks die with their process, so the lock of a run that was killed
  (even with SIGKILL) is free again: its stale lock file is taken over and
  reported. A second run in the same workdir gets WorkdirError naming the
  holder; in a multi-process job every process gets it. On a filesystem that
  cannot lock (a gcsfuse-mounted bucket), the run goes on unlocked and says so.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'lock')
    self.file = None
    self.previous = ''
    self.unsupported = ''  # why the filesystem could not lock, if it could not

  def __enter__(self):
    ok, message = True, ''
    if jax.process_index() == 0:
      try:
        f = open(self.path, 'a+')  # noqa: SIM115 - held for the run's lifetime
      except OSError as e:
        raise WorkdirError(fs_error('cannot open the workdir lock file', e)) from None
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = True
      except OSError as e:
        held = e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        if held:  # the filesystem cannot lock (e.g. a gcsfuse bucket): run unlocked
          self.unsupported = f'{e.strerror or e}'
      if not held:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        ok, message = False, (f'workdir {os.path.dirname(self.path)!r} is in use by another run '
                              f'({holder}); wait for it to finish or use another --workdir')
      else:
        f.seek(0)
        self.previous = f.read().strip()  # a dead run's (stale) lock, if any
        try:
          f.seek(0)
          f.truncate()
          f.write(f'pid {os.getpid()} on {socket.gethostname()} since '
                  f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
          f.flush()
        except OSError as e:
          with contextlib.suppress(OSError):  # (closing flushes the same bytes again)
            f.close()
          raise WorkdirError(fs_error(f'cannot write the workdir lock file {self.path}', e)
                             ) from None
        self.file = f
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      ok = bool(multihost_utils.broadcast_one_to_all(jax.numpy.asarray(ok)))
    if not ok:
      raise WorkdirError(message or 'the workdir is in use by another run (see process 0)')
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      self.file.seek(0)
      self.file.truncate()
      if not self.unsupported:
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
      self.file.close()
      self.file = None
