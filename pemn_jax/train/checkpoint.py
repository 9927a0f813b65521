"""Orbax checkpointing of the train state (+ JSON metadata: step, config)."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; it is left untouched on disk."""


class Checkpointer:
  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, train_state, meta: dict, force: bool = False):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state):
    """Restores ``step`` into the structure/shardings of ``abstract_state``."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean the same here
      raise CheckpointError(
          f'cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: '
          f'{str(e)[:500]}. The checkpoint was left untouched. If it is corrupt or from another '
          'config, move it away (or use another --workdir) to start over.') from e
    return out.state, out.meta

  def restore_meta(self, step: int) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f'cannot read the metadata of checkpoint step {step} in '
                            f'{self.directory}: {e}') from e

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
