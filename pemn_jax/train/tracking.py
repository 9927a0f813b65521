"""A run's bookkeeping: its records (metrics.jsonl, TensorBoard), best and
final test accuracy, and the divergence checks on both."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np


class DivergenceError(RuntimeError):
  """Training produced non-finite values; the last finite checkpoint is kept."""


def _summary_writer():
  """tensorboardX's ``SummaryWriter``, imported without PyTorch. Its writer
  module imports torch where it is installed (1.5 s and ~200 MiB here, every
  run) only to accept torch tensors, which the tracker never passes: while
  tensorboardX loads, ``torch`` is marked absent (``sys.modules[name] =
  None`` makes its import raise ImportError, tensorboardX's own fallback),
  unless this process already imported it."""
  if 'torch' in sys.modules or 'tensorboardX.writer' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get('torch', 0) is None:
      del sys.modules['torch']
  return SummaryWriter


class Tracker:
  """One run's records, best/final test accuracy and divergence checks.

  Records go to ``workdir/metrics.jsonl`` and TensorBoard event files
  (``workdir/tensorboard``, through tensorboardX: no TensorFlow), written by
  process 0. On resume the records after the checkpoint's step (written
  before a crash) are dropped and purged from TensorBoard's view, so no step
  appears twice.

  Args:
    workdir: the run's directory.
    report: the run's storage report (logged with every record).
    sched: its learning rate of step.
    batch_size: its global batch (for images/s).
    is_main: this process writes the files.
    label: how messages name the run ('' for a single run).
  """

  def __init__(self, workdir: str, report: dict, sched, batch_size: int, is_main: bool,
               label: str = ''):
    self.path, self.tb_dir, self.tb = (os.path.join(workdir, 'metrics.jsonl'),
                                       os.path.join(workdir, 'tensorboard'), None)
    self.report, self.sched, self.batch_size = report, sched, batch_size
    self.is_main, self.label = is_main, label
    self.best: dict = {}   # best test accuracy over evaluations (the PEMN reference reports it)
    self.last: dict = {}   # the last evaluation

  def resume(self, start: int, meta: dict | None):
    """Continue after checkpoint ``start`` (``meta``: its metadata)."""
    if start:
      self.best = dict((meta or {}).get('best', {}))
      self._truncate_after(start)
    if self.is_main:
      self.tb = _summary_writer()(self.tb_dir, purge_step=start or None, flush_secs=30)

  def _truncate_after(self, step: int):
    if not self.is_main or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for ln in f:
        try:
          if ln.strip() and json.loads(ln).get('step', 0) <= step:
            keep.append(ln)
        except ValueError:  # a line cut by a crash
          continue
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(self.path + '.tmp', self.path)

  def write(self, record: dict):
    if self.is_main:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      if self.tb is not None:
        for k, v in record.items():
          if k != 'step' and isinstance(v, (int, float)):
            self.tb.add_scalar(k, v, record['step'])

  def diverged(self, step: int, value) -> DivergenceError:
    which = f' (variant {self.label})' if self.label else ''
    return DivergenceError(f'training diverged{which}: the loss is {value} at step {step}')

  def record(self, step: int, ms: list[dict], seconds: float) -> dict:
    """Logs the steps ``step - len(ms) + 1 .. step`` (``ms``: each step's
    metrics, host scalars); DivergenceError at a non-finite loss."""
    losses = [float(x['loss']) for x in ms]
    for i, x in enumerate(ms):
      for v in (float(x['loss']), float(x.get('regularizer', 0.0))):
        if not math.isfinite(v):
          raise self.diverged(step - len(ms) + i + 1, v)
    # The parameterization's metrics describe its state: the last step's.
    mean = ('loss', 'accuracy', 'regularizer')  # over the steps; the rest: the last step's
    rec = {'step': step, 'loss': float(np.mean(losses)),
           'accuracy': float(np.mean([x['accuracy'] for x in ms])),
           **({'regularizer': float(np.mean([x['regularizer'] for x in ms]))}
              if 'regularizer' in ms[-1] else {}),
           **{k: float(ms[-1][k]) for k in ms[-1] if k not in mean},
           'lr': float(self.sched(step - 1)), 'images_per_s': len(ms) * self.batch_size / seconds,
           'trainable': self.report['trainable'], 'model_bytes': self.report['model_bytes']}
    self.write(rec)
    return rec

  def evaluated(self, step: int, accuracy: float, loss: float, write: bool = True) -> dict:
    """Records an evaluation; DivergenceError at a non-finite test loss."""
    if not math.isfinite(loss):
      raise self.diverged(step, f'{loss} (test)')
    if accuracy >= self.best.get('best_test_accuracy', -1.0):
      self.best = {'best_test_accuracy': accuracy, 'best_step': step}
    self.last = {'step': step, 'test_accuracy': accuracy, 'test_loss': loss, **self.best}
    if write:
      self.write(self.last)
    return self.last

  def result(self, step: int, total: int) -> dict:
    """Plain metrics of the run so far (see ``train_and_evaluate``)."""
    return {**self.last, 'step': step, 'stopped': step < total, **self.report}

  def close(self):
    if self.tb is not None:
      self.tb.close()
      self.tb = None
