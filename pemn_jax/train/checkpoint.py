"""Orbax checkpointing of the train state, verified.

Orbax keeps no checksum of array data: one flipped byte restores silently
into another state. Here every saved state carries a digest computed on
device (one uint32 per leaf: a sum of position-keyed hashes of the values'
bits) in the step's JSON metadata, which carries its own SHA-256. Each save
is read back and checked once complete (*verified*); old steps are deleted by
this class, never the newest verified one; ``restore_latest`` tries steps
from newest to oldest and moves those that fail to ``checkpoints/rejected/``
(nothing is deleted); if none restores it raises and touches nothing.

A save that cannot be written (a full disk, a read-only or vanished
directory) raises CheckpointSaveError at once -- checked before orbax
starts (free space for another step of the size of the last one, a writable
directory), or when its background write fails (``poll``, every training
step) -- with the earlier steps
kept, the failed step's temporary directory removed and orbax's background
threads of that save released (a failed async save leaves them waiting for
each other's signals: the process could never exit). Temporary directories
of saves that a killed process left are removed at start-up.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pemn_jax.ops.hashing import lowbias32
from pemn_jax.pytrees import per_array
from pemn_jax.train.workdir import WorkdirError, check_kind, fs_error


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; it is left untouched on disk."""


class CheckpointSaveError(WorkdirError):
  """A checkpoint that could not be written; the earlier ones are kept."""


def discard_failed_save(path: str):
  """After an orbax save to ``path`` failed: its background threads released
  (``release_orbax_threads``) and its temporary directories removed (process
  0). Used for training checkpoints and export's dense-params checkpoint."""
  release_orbax_threads()
  if jax.process_index() == 0:
    for tmp in glob.glob(glob.escape(path) + '.orbax-checkpoint-tmp*'):
      shutil.rmtree(tmp, ignore_errors=True)


def release_orbax_threads():
  """Ends the background threads of a failed async orbax save: each waits
  (up to orbax's coordination timeout, minutes) for a signal that the failed
  thread never sends, and they are not daemons, so the process could not
  exit. Each is cancelled and given its signal; it then returns without
  running. (orbax 0.12's ``_SignalingThread``; nothing to do if absent.)"""
  try:
    from orbax.checkpoint._src.futures import future
  except ImportError:
    return
  kind = getattr(future, '_SignalingThread', None)
  for t in threading.enumerate():
    if kind is not None and isinstance(t, kind) and t.is_alive():
      t.cancel()
      future.set_signals(t._receive_signals, operation_id=t._operation_id)  # noqa: SLF001


def meta_digest(meta: dict) -> str:
  """SHA-256 of the metadata as JSON stores it (keys sorted), ``meta_digest``
  itself left out."""
  body = {k: v for k, v in meta.items() if k != 'meta_digest'}
  text = json.dumps(json.loads(json.dumps(body)), sort_keys=True, allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


def check_meta(meta: dict, step: int, directory: str) -> dict:
  """``meta`` if its ``meta_digest`` matches (or it has none: older
  checkpoints); CheckpointError otherwise."""
  want = meta.get('meta_digest')
  if want is not None and want != meta_digest(meta):
    raise CheckpointError(f'checkpoint step {step} in {directory} is corrupt: its metadata '
                          'differs from the digest recorded when it was saved')
  return meta


def _as_u32(x):
  """The bits of ``x`` as a flat uint32 array."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = x.reshape(-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    small = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 8 bytes -> 2 words


@jax.jit
def state_digest(tree) -> jax.Array:
  """One uint32 per leaf: the sum over elements of a hash of (bits, index);
  any changed value changes it (but for a 2^-32 chance)."""
  words = [_as_u32(jnp.asarray(x)) for x in jax.tree.leaves(tree)]
  if not words:
    return jnp.zeros((0,), jnp.uint32)

  def sums(rows):  # (k, n) words -> (k,) digests
    idx = jnp.arange(rows.shape[1], dtype=jnp.uint32)
    return jnp.sum(lowbias32(rows ^ lowbias32(idx * jnp.uint32(0x9E3779B1) + 1)), axis=1,
                   dtype=jnp.uint32)
  return jnp.stack(per_array(sums, words))


def replicated_sharding():
  """A sharding that replicates over this process's devices (restoring a
  checkpoint for export or evaluation, whatever mesh wrote it)."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(devices, ('all',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


# The train-state fields a partial restore reads (all but ``opt_state``).
PARTIAL_FIELDS = ('step', 'state', 'model_state', 'seed')


def _without_opt_state(got: list, want: list, state) -> tuple[list, list]:
  """The digests of a train state's leaves (``step``, ``state``,
  ``opt_state``, ``model_state``, ``seed`` in field order) without the
  optimizer state's: ``got`` of a state whose ``opt_state`` is None, ``want``
  recorded with it."""
  n_state, n_model = len(jax.tree.leaves(state.state)), len(jax.tree.leaves(state.model_state))
  want = list(want)
  if len(want) < len(got):
    return got, want
  return got, want[:1 + n_state] + want[len(want) - n_model - 1:]


def _tree_bytes(path: str) -> int:
  """The bytes of the files under ``path``."""
  total = 0
  for d, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(d, f))
      except OSError:
        continue
  return total


class Checkpointer:
  """Saves, verifies, rotates and restores train states in ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int, verify: bool = True, writer: bool = False):
    """Args:
      workdir: the run's directory.
      keep: how many steps rotation keeps (plus the newest verified one).
      verify: read back each save.
      writer: this process trains in ``workdir`` (holding its lock): the
        temporary directories of saves a killed run left are removed. (A
        reader, like export during training, must not: one may be a save
        in flight.)
    """
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.keep, self.verify = int(keep), bool(verify)
    check_kind(workdir, 'checkpoints')  # (readers, like export, come here without prepare)
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, item_names=('state', 'meta'),
          options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                               cleanup_tmp_directories=writer))
    except OSError as e:
      raise WorkdirError(fs_error(f'cannot use the checkpoint directory {self.directory}', e)
                         ) from None
    self._unverified = None        # (step, abstract state) of the last save
    self._closed = False
    self._failed = False           # a save failed: nothing more is written or waited for
    self.last_verified = None      # newest step known to restore to its digest
    self.messages: list[str] = []  # what happened, for the user

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, train_state, meta: dict, force: bool = False):
    """Saves asynchronously; the previous save is verified first.

    Raises:
      CheckpointSaveError: this save (or the previous one) cannot be
        written; the earlier steps are kept.
    """
    self._verify_pending()
    self._check_room(step)
    digest = [int(x) for x in jax.device_get(state_digest(train_state))]
    meta = {**meta, 'digest': digest}
    meta['meta_digest'] = meta_digest(meta)
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(train_state),
          meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
      raise self._save_failed(step, e) from e
    self._unverified = (step, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        train_state))

  def poll(self):
    """Finishes the pending save once its background write is over, without
    waiting for it: a write that failed raises CheckpointSaveError now (the
    loop calls this every step), not at the next save. In a multi-process
    job nothing is done (the processes would finish at different steps;
    the next save or ``close`` finds the failure)."""
    if (self._unverified is not None and not self._failed and jax.process_count() == 1
        and not self.manager.is_saving_in_progress()):
      self._verify_pending()

  def _verify_pending(self):
    if self._unverified is None:
      return
    step, abstract = self._unverified
    self._unverified = None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the background write failed
      raise self._save_failed(step, e) from e
    if self.verify:
      try:
        self.restore(step, abstract)
      except CheckpointError as e:
        self.messages.append(f'checkpoint step {step} did not read back as saved ({e}); '
                             'older steps are kept')
        return
    self.last_verified = step
    self._rotate()

  def _check_room(self, step: int):
    """CheckpointSaveError before writing step ``step`` into a directory that
    is not writable or has less free space than the last verified step
    takes (process 0 looks; in a multi-process job every process gets its
    answer)."""
    cause = ''
    if jax.process_index() == 0:
      if not os.access(self.directory, os.W_OK | os.X_OK):
        cause = 'it is not writable (a read-only filesystem or mount, or its permissions)'
      else:
        last = (0 if self.last_verified is None else
                _tree_bytes(os.path.join(self.directory, str(self.last_verified))))
        with contextlib.suppress(OSError):
          st = os.statvfs(self.directory)
          free = st.f_bavail * st.f_frsize
          if free < last + (1 << 16):
            cause = (f'No space left on device: {free / 2**20:.2f} MiB free, the last step '
                     f'took {last / 2**20:.2f} MiB')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if bool(multihost_utils.broadcast_one_to_all(jnp.asarray(bool(cause)))):
        cause = cause or 'process 0 found its directory full or not writable (see its log)'
    if cause:
      raise self._save_failed(step, None, cause)

  def _save_failed(self, step: int, e, cause: str = '') -> CheckpointSaveError:
    """The error of a save that failed: threads released, its temporary
    files removed, what is kept and how to resume said."""
    self._failed = True
    discard_failed_save(os.path.join(self.directory, str(step)))
    try:
      self.manager.reload()
      kept = sorted(int(s) for s in self.manager.all_steps())
    except Exception:  # noqa: BLE001 - the directory may be gone
      kept = []
    what = f'cannot save checkpoint step {step} in {self.directory}'
    line = f'{what}: {cause}' if cause else fs_error(what, e)
    if kept:
      after = (f'The earlier checkpoints (steps {", ".join(map(str, kept))}) are kept: make room '
               f'(or fix the directory) and run the same command again to resume from step '
               f'{kept[-1]}.')
    else:
      after = 'No earlier checkpoint exists: make room (or fix the directory) and run again.'
    return CheckpointSaveError(f'{line}. {after}')

  def _rotate(self):
    steps = self.all_steps()
    keep = set(steps[-self.keep:])
    if self.last_verified is not None:
      keep.add(self.last_verified)
    for s in steps:
      if s not in keep:
        self.manager.delete(s)

  def restore(self, step: int, abstract_state, partial: bool = False):
    """Restores ``step`` into the structure/shardings of ``abstract_state`` and
    checks its digest; CheckpointError if it cannot or does not match.

    Args:
      step: the step.
      abstract_state: ShapeDtypeStructs (with shardings) of the state.
      partial: ``abstract_state`` is a train state whose ``opt_state`` is
        None: every other field is read and checked, the optimizer state is
        not (what export and evaluation need; no optimizer is built).
    Returns:
      ``(state, meta)``.
    """
    if partial:
      item = {k: getattr(abstract_state, k) for k in PARTIAL_FIELDS}
      state_args = ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=state_args,
                                                               meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean the same here
      first_line = str(e).strip().split('\n')[0][:200]
      raise CheckpointError(
          f'cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: '
          f'{first_line}') from e
    meta = check_meta(dict(out.meta), step, self.directory)
    if meta.get('step', step) != step:
      raise CheckpointError(f'checkpoint directory {step} in {self.directory} holds step '
                            f'{meta.get("step")}: renamed or mixed up')
    state = (abstract_state.replace(**{k: out.state[k] for k in PARTIAL_FIELDS}) if partial
             else out.state)
    want = meta.get('digest')
    if want is not None:
      got = [int(x) for x in jax.device_get(state_digest(state))]
      if partial:  # the leaves of every field but the optimizer state's, in order
        got, want = _without_opt_state(got, want, state)
      if got != list(want):
        bad = sum(a != b for a, b in zip(got, want, strict=True)) if len(got) == len(want) \
            else len(got)
        raise CheckpointError(f'checkpoint step {step} in {self.directory} is corrupt: {bad} '
                              'array(s) differ from the digest recorded when it was saved')
    return state, meta

  def restore_latest(self, abstract_state):
    """(step, state, meta) of the newest step that restores and verifies, or
    (0, None, None) when there is none. Steps that fail are moved to
    ``rejected/`` once an older one has restored (so nothing is lost and the
    run can save those step numbers again); if none restores, CheckpointError
    and the directory is left as it was."""
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointError as e:
        failures.append((step, e))
        continue
      for bad, e in failures:
        dest = self._reject(bad)
        self.messages.append(f'checkpoint step {bad} was rejected ({e}); moved to {dest}; '
                             f'resuming from step {step}')
      self.last_verified = step
      return step, state, meta
    if failures:
      detail = '; '.join(str(e) for _, e in failures[:3])
      raise CheckpointError(f'no checkpoint in {self.directory} restores ({detail}). '
                            + self._layout_hint(steps[-1], abstract_state) + 'The '
                            'checkpoints were left untouched. If they are from another config or '
                            'corrupt, move them away (or use another --workdir) to start over.')
    return 0, None, None

  def _layout_hint(self, step: int, abstract_state) -> str:
    """Why ``step`` may not fit ``abstract_state`` ('' when nothing is seen)."""
    try:
      saved = len(self.restore_meta(step)['digest'])  # one digest per array
    except (CheckpointError, KeyError, TypeError):
      return ''
    if saved == len(jax.tree.leaves(abstract_state)):
      return ''
    return (f'Its train state holds {saved} arrays, this run\'s '
            f'{len(jax.tree.leaves(abstract_state))}: it was written by another pemn_jax '
            'version (optimizer states before 2026-11-24 held no learning rate) or optimizer, '
            'and cannot resume training here; export, evaluate and evolve still read its '
            'trained state. ')

  def _reject(self, step: int) -> str:
    dest = os.path.join(self.directory, 'rejected', f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), dest)
      except OSError as e:
        raise WorkdirError(fs_error(f'cannot move the corrupt checkpoint step {step} to {dest}',
                                    e)) from None
    self.manager.reload()
    return dest

  def restore_meta(self, step: int) -> dict:
    """The metadata of ``step``, checked against its digest."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f'cannot read the metadata of checkpoint step {step} in '
                            f'{self.directory}: {e}') from e
    return check_meta(dict(meta), step, self.directory)

  def stored_config(self):
    """The config recorded by the newest step whose metadata is intact
    (corrupt steps are left for ``restore_latest`` to reject), or None."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore_meta(step).get('config', {})
      except CheckpointError:
        continue
    return None

  def wait(self):
    """Waits for the pending save and verifies it (CheckpointSaveError if
    it failed)."""
    self._verify_pending()

  def abandon(self):
    """Stops using the manager without finishing pending saves (another
    process of the job died: finishing would wait for it). Finalized steps
    on disk are untouched; a save in flight stays an uncommitted temporary
    directory that orbax ignores."""
    self._closed = True

  def close(self):
    if self._closed:
      return
    self._closed = True
    if self._failed:  # (waiting would raise the failure again)
      return
    self._verify_pending()
    self.manager.close()
