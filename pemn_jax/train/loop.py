"""The training loop: sharded jitted steps, eval, metrics, checkpoints, resume.

The loop is method-agnostic: the config's ``param`` spec becomes a
parameterization and the step differentiates w.r.t. its state only.

Safety: the workdir is locked by one run; a resumed run must have the same
config as its checkpoints (``config.RESUMABLE_KEYS`` aside); checkpoints are
verified against a digest and a corrupt one falls back to the newest good
one; a run whose loss or state turns non-finite stops with DivergenceError
and never checkpoints the non-finite state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from pemn_jax import models
from pemn_jax import params as P
from pemn_jax.config import RESUMABLE_KEYS, ConfigError, config_differences, validate
from pemn_jax.data import sources
from pemn_jax.data.pipeline import Pipeline
from pemn_jax.data.prefetch import Prefetcher
from pemn_jax.train.checkpoint import Checkpointer, CheckpointError, all_finite
from pemn_jax.train.multihost import lost_peer
from pemn_jax.train.optim import (
  make_optimizer,
  set_hyperparams,
  upgrade_opt_state,
  with_pruning,
)
from pemn_jax.train.sharding import Layout, ShardingError, bytes_per_device, device_memory_limit
from pemn_jax.train.step import create_train_state, eval_batch, make_train_step
from pemn_jax.train.workdir import WorkdirLock, prepare


def legacy_abstract(run: Setup, config, shardings):
  """The abstract train state (laid out per ``shardings(abstract)``) of a
  checkpoint written before the optimizer held its hyperparameters
  (``make_optimizer(inject=False)``)."""
  tx, _ = make_optimizer(config.optimizer, run.total, run.pipe.steps_per_epoch, inject=False)
  tx = with_pruning(tx, config.prune, run.total, config.seed, run.param)

  def init(k):
    return create_train_state(run.param, tx, k,
                              models.init_model_state(run.model, run.train_ds.image_shape),
                              config.seed)
  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings(abstract))


def upgrade_state(fresh, legacy, out_shardings=None):
  """``legacy`` (a restored older train state) with its optimizer state in
  the structure of ``fresh`` (a new one of the same run: its hyperparameters
  are kept)."""
  return jax.jit(lambda f, t: t.replace(opt_state=upgrade_opt_state(f.opt_state, t.opt_state)),
                 out_shardings=out_shardings)(fresh, legacy)


def _restore_legacy(ckpt, run, config, fresh, ts_shardings, layout):
  """(step, state, meta) of the newest older-format checkpoint, upgraded, or
  None when none restores in that format either."""
  abstract = legacy_abstract(run, config, layout.state_shardings)
  try:
    start, restored, meta = ckpt.restore_latest(abstract)
  except CheckpointError:
    return None
  return start, upgrade_state(fresh, restored, ts_shardings), meta


class DivergenceError(RuntimeError):
  """Training produced non-finite values; the last finite checkpoint is kept."""


class _Stop:
  """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly.

  In a multi-process job the processes must stop at the same step (saving
  is collective): ``requested(step)`` agrees on it every ``SYNC_EVERY``
  steps (one all-gather of a flag), so a signal to any process stops all of
  them within that many steps.
  """

  SYNC_EVERY = 10

  def __init__(self):
    self.signum = None
    self._old = {}

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signum is not None
    if step % self.SYNC_EVERY:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    self.signum = self.signum or int(np.max(flags)) or None
    return self.signum is not None

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def storage_report(param: P.Parameterization) -> dict:
  bits = param.storage_bits()
  return {'dense_bytes': 4 * param.num_params,
          'model_bytes': int(math.ceil(sum(bits.values()) / 8)),
          'num_params': param.num_params, 'trainable': param.num_trainable()}


def global_batch(sharding, *arrays):
  """This process's slices of a batch as global arrays laid out per ``sharding``."""
  return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in arrays)


def eval_sums(eval_step, ts, pipe: Pipeline, to_global):
  """(correct, total, loss) summed over ``pipe``'s evaluation batches, as
  float64 numpy arrays (scalars, or one per variant of a vmapped sweep)."""
  correct = total = loss = 0.0
  for images, labels, weights in pipe.eval_batches():
    out = eval_step(ts, *to_global(images, labels, weights))
    correct, total, loss = correct + out[0], total + out[1], loss + out[2]
  return tuple(np.asarray(jax.device_get(x), np.float64) for x in (correct, total, loss))


def evaluate(eval_step, ts, pipe: Pipeline, to_global):
  correct, total, loss = (float(x) for x in eval_sums(eval_step, ts, pipe, to_global))
  return {'test_accuracy': correct / total, 'test_loss': loss / total}


class Metrics:
  """metrics.jsonl and TensorBoard event files (``workdir/tensorboard``,
  through tensorboardX: no TensorFlow), written by process 0. On resume the
  records after the checkpoint's step (written before a crash) are dropped
  from metrics.jsonl and purged from TensorBoard's view, so no step appears
  twice."""

  def __init__(self, workdir: str, is_main: bool):
    self.path, self.is_main = os.path.join(workdir, 'metrics.jsonl'), is_main
    self.tb_dir, self.tb = os.path.join(workdir, 'tensorboard'), None

  def open_tensorboard(self, start: int):
    if self.is_main:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(self.tb_dir, purge_step=start or None, flush_secs=30)

  def close(self):
    if self.tb is not None:
      self.tb.close()
      self.tb = None

  def truncate_after(self, step: int):
    if not self.is_main or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
      try:
        if json.loads(ln).get('step', 0) <= step:
          keep.append(ln)
      except ValueError:  # a line cut by a crash
        continue
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, record: dict):
    if self.is_main:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      if self.tb is not None:
        for k, v in record.items():
          if k != 'step' and isinstance(v, (int, float)):
            self.tb.add_scalar(k, v, record['step'])


def train_and_evaluate(config, workdir: str, model=None) -> dict:
  """Trains per ``config`` in ``workdir``, resuming from its checkpoints.

  Args:
    config: a training config (``pemn_jax.config.base_config()`` schema).
    workdir: the run's directory (checkpoints, metrics.jsonl, lock).
    model: optionally the model itself (a Linen module or
      ``models.NNXModel``); ``config.model`` then only names it in
      checkpoints and model files. By default ``models.get(config.model,
      **config.model_kwargs)`` (a registry name or an import path).
  Returns:
    Plain metrics: ``step``, ``stopped`` (stopped before the end), the last
    evaluation's ``test_accuracy``/``test_loss``, ``best_test_accuracy`` and
    ``best_step``, and the storage report. The trained state is in the
    workdir's checkpoints (``pemn_jax.export.run.load_run``).
  Raises:
    ConfigError, DataError, CheckpointError, WorkdirError, DivergenceError.
  """
  validate(config)
  workdir = prepare(workdir)
  with WorkdirLock(workdir) as lock:
    if lock.unsupported:
      print(f'warning: {workdir} cannot be locked ({lock.unsupported}); make sure no other run '
            'uses it', flush=True)
    return _train(config, workdir, model)


@dataclasses.dataclass
class Setup:
  """What a training run is made of, built from its config (``setup``): the
  trainer and the sweeps (``pemn_jax.sweep``) start from it."""
  layout: Layout
  train_ds: Any
  pipe: Pipeline            # training batches (order: config.data_seed, else config.seed)
  test_pipe: Pipeline       # evaluation batches (padded to the devices)
  model: Any
  param: P.Parameterization
  total: int                # training steps
  tx: Any                   # optax transformation (pruning wrapper included)
  sched: Any                # learning rate of step

  def init_state(self, key, seed):
    """The initial ``TrainState`` (not jitted; ``seed`` may be traced)."""
    return create_train_state(self.param, self.tx, key,
                              models.init_model_state(self.model, self.train_ds.image_shape),
                              seed)


def data_seed(config) -> int:
  """The seed of the training data order and augmentation draws."""
  return config.seed if config.data_seed < 0 else config.data_seed


def setup(config, model=None, decay: bool | None = None) -> Setup:
  """Builds a run's data pipelines, model, parameterization and optimizer.

  Args:
    config: a validated training config.
    model: optionally the model (see ``train_and_evaluate``).
    decay: include the weight-decay term in the optimizer (``make_optimizer``).
  Returns:
    A ``Setup``.
  Raises:
    ConfigError, DataError.
  """
  try:
    layout = Layout.from_config(config)
  except ShardingError as e:
    raise ConfigError(str(e)) from None
  if config.batch_size % jax.device_count():
    raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by the '
                      f'{jax.device_count()} devices')
  # Evaluation pads its batches (padding weighs 0): round up to the devices.
  eval_size = -(-config.eval_batch_size // jax.device_count()) * jax.device_count()

  load = lambda split: sources.load(config.dataset, split, config.data_dir or None,  # noqa: E731
                                    config.source_dir or None)
  pidx, pcount = jax.process_index(), jax.process_count()
  if pcount > 1:  # process 0 prepares local datasets; the others wait, then read
    from jax.experimental import multihost_utils
    if pidx == 0:
      load('train'), load('test')
    multihost_utils.sync_global_devices('pemn_jax:data_ready')
  train_ds, test_ds = load('train'), load('test')
  try:
    pipe = Pipeline(train_ds, config.batch_size, data_seed(config), config.augment, pidx, pcount,
                    config.train_limit or None, config.augment_options.to_dict())
  except ValueError as e:
    raise ConfigError(f'config.batch_size={config.batch_size}: {e}') from None
  test_pipe = Pipeline(test_ds, eval_size, config.seed, '', pidx, pcount,
                       config.test_limit or None, training=False)

  if model is None:
    try:
      model = models.get(config.model, num_classes=train_ds.num_classes,
                         **config.model_kwargs.to_dict())
    except ValueError as e:
      which = (f'config.model_kwargs={config.model_kwargs.to_dict()!r}'
               if config.model_kwargs and 'bad options' in str(e) else
               f'config.model={config.model!r}')
      raise ConfigError(f'{which}: {e}') from None
  target = models.abstract_params(model, train_ds.image_shape)
  total = config.num_steps or max(1, int(config.num_epochs * pipe.steps_per_epoch))
  try:
    param = P.build(config.param, target, model=model, total_steps=total)
    layout.resolve(param)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.param: {e}') from e
  tx, sched = make_optimizer(config.optimizer, total, pipe.steps_per_epoch, decay)
  tx = with_pruning(tx, config.prune, total, config.seed, param)
  return Setup(layout, train_ds, pipe, test_pipe, model, param, total, tx, sched)


def _train(config, workdir: str, model=None) -> dict:
  run = setup(config, model)
  layout, train_ds, pipe, test_pipe = run.layout, run.train_ds, run.pipe, run.test_pipe
  model, param, total, tx, sched = run.model, run.param, run.total, run.tx, run.sched
  repl, data_sharding = layout.replicated, layout.batch
  pidx, pcount = jax.process_index(), jax.process_count()

  def init_state(k):
    return run.init_state(k, config.seed)

  abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
  try:
    ts_shardings = layout.state_shardings(abstract)
  except ShardingError as e:
    raise ConfigError(str(e)) from None
  need, limit = bytes_per_device(abstract, ts_shardings), device_memory_limit()
  if limit is not None and need > limit:
    raise ConfigError(
        f'the train state needs {need / 2**20:.1f} MiB per device on the mesh '
        f'{dict(layout.mesh.shape)} with config.sharding.state={config.sharding.state!r}, but a '
        f'device holds {limit / 2**20:.1f} MiB: use more devices (config.mesh) or shard the '
        "state (config.sharding.state='fsdp' with config.mesh.fsdp > 1)")
  ts = jax.jit(init_state, out_shardings=ts_shardings)(jax.random.key(config.seed))
  is_main = pidx == 0
  say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
  metrics = Metrics(workdir, is_main)
  ckpt = Checkpointer(workdir, config.keep_checkpoints, config.verify_checkpoints)
  start, best = 0, {}  # best test accuracy over evaluations (the PEMN reference reports it)
  steps = ckpt.all_steps()
  if steps:
    stored = ckpt.stored_config()
    diffs = config_differences(stored, config.to_dict()) if stored is not None else []
    if diffs:
      raise ConfigError(f'{workdir} holds checkpoints of another config; differing keys: '
                        + '; '.join(diffs[:10]) + '. Only these keys may change on resume: '
                        + ', '.join(RESUMABLE_KEYS) + '. Use another --workdir for a new '
                        'config.')
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            ts, ts_shardings)
    try:
      start, restored, meta = ckpt.restore_latest(abstract)
    except CheckpointError as e:  # written before the optimizer held its hyperparameters?
      legacy = _restore_legacy(ckpt, run, config, ts, ts_shardings, layout)
      if legacy is None:
        raise e from None
      start, restored, meta = legacy
      say(f'note: upgraded the optimizer state of {ckpt.directory} (step {start}) to hold its '
          'learning rate and weight decay')
    for msg in ckpt.messages:
      say(f'warning: {msg}')
    ckpt.messages.clear()
    ts, best = restored, dict(meta.get('best', {}))
    # optimizer.lr may change on resume: the rate held in the optimizer state follows it.
    # (inside jit: the state may span processes).
    lr = float(config.optimizer.lr)
    ts = jax.jit(lambda t: t.replace(opt_state=set_hyperparams(t.opt_state, learning_rate=lr)),
                 in_shardings=(ts_shardings,), out_shardings=ts_shardings, donate_argnums=0)(ts)
    if start > total:
      raise ConfigError(f'the checkpoint in {workdir} is at step {start}, beyond this run\'s '
                        f'{total} steps (config.num_steps/num_epochs): raise them to continue, '
                        'or use another --workdir')
    metrics.truncate_after(start)
    say(f'resumed from step {start} ({ckpt.directory})')

  step_fn = make_train_step(model, param, tx, layout.materialize)

  def train_step_at(ts, images, labels, step):
    # the step's key derived inside the step: one dispatch per step, not two
    return step_fn(ts, images, labels, jax.random.fold_in(jax.random.key(config.seed), step))

  train_step = jax.jit(train_step_at, in_shardings=(ts_shardings, data_sharding, data_sharding,
                                                    repl),
                       out_shardings=(ts_shardings, repl), donate_argnums=0)

  @functools.partial(jax.jit, in_shardings=(ts_shardings, data_sharding, data_sharding,
                                            data_sharding), out_shardings=repl)
  def eval_step(ts, images, labels, weights):
    return eval_batch(model, lambda rng: layout.materialize(param, ts.state, ts.seed, rng),
                      ts.model_state, images, labels, weights, param.eval_rngs(ts.seed))

  to_global = functools.partial(global_batch, data_sharding)

  def diverged(at_step, value):
    return DivergenceError(f'training diverged: the loss is {value} at step {at_step}')

  report = storage_report(param)
  if not start:
    say(f'{config.model} x {config.param.name}: N={report["num_params"]} trainable='
        f'{report["trainable"]} model_bytes={report["model_bytes"]} dense_bytes='
        f'{report["dense_bytes"]} steps={total} devices={jax.device_count()} processes={pcount} '
        f'{layout.describe()}')
  end = min(total, config.stop_at_step) if config.stop_at_step else total
  acc_metrics, t_last, step = [], time.time(), start
  last = {}
  metrics.open_tensorboard(start)
  def step_inputs(s):  # the inputs of step s: on a background thread with config.prefetch
    return (*to_global(*pipe.batch(s)), np.uint32(s))

  try:
    with _Stop() as stop, Prefetcher(step_inputs, range(start, end), config.prefetch) as inputs:
      while step < end:
        ts, m = train_step(ts, *next(inputs))
        step += 1
        acc_metrics.append(m)
        if step % config.log_every == 0 or step == end:
          ms = jax.device_get(acc_metrics)
          losses = [float(x['loss']) for x in ms]
          for i, v in enumerate(losses):
            if not math.isfinite(v):
              raise diverged(step - len(ms) + i + 1, v)
          dt = time.time() - t_last
          # The parameterization's metrics describe its state: the last step's.
          rec = {'step': step, 'loss': float(np.mean(losses)),
                 'accuracy': float(np.mean([x['accuracy'] for x in ms])),
                 **{k: float(ms[-1][k]) for k in ms[-1] if k not in ('loss', 'accuracy')},
                 'lr': float(sched(step - 1)), 'images_per_s': len(ms) * config.batch_size / dt,
                 'trainable': report['trainable'], 'model_bytes': report['model_bytes']}
          eta = (total - step) * dt / len(ms)
          extra = ''.join(f' {k} {rec[k]:.4g}' for k in ms[0] if k not in ('loss', 'accuracy'))
          say(f'step {step}/{total} loss {rec["loss"]:.4f} acc {rec["accuracy"]:.4f} '
              f'lr {rec["lr"]:.3g}{extra} {rec["images_per_s"]:.0f} img/s eta {eta:.0f}s')
          metrics.write(rec)
          acc_metrics, t_last = [], time.time()
        if (config.eval_every and step % config.eval_every == 0) or step == total:
          last = {'step': step, **evaluate(eval_step, ts, test_pipe, to_global)}
          if not math.isfinite(last['test_loss']):
            raise diverged(step, f'{last["test_loss"]} (test)')
          if last['test_accuracy'] >= best.get('best_test_accuracy', -1.0):
            best = {'best_test_accuracy': last['test_accuracy'], 'best_step': step}
          last.update(best)
          say(f'eval step {step}: test accuracy {last["test_accuracy"]:.4f} test loss '
              f'{last["test_loss"]:.4f} (best {best["best_test_accuracy"]:.4f} at step '
              f'{best["best_step"]})')
          metrics.write(last)
          t_last = time.time()
        stopping = stop.requested(step)
        if step % config.checkpoint_every == 0 or step == end or stopping:
          if not all_finite((ts.state, ts.opt_state, ts.model_state)):
            raise diverged(step, 'finite, but the state is not')
          ckpt.save(step, ts, {'step': step, 'config': config.to_dict(), 'best': best,
                               'num_classes': train_ds.num_classes,
                               'input_shape': list(train_ds.image_shape)}, force=True)
        if stopping:
          ckpt.wait()
          say(f'received signal {stop.signum}: checkpoint saved at step {step}, exiting')
          break
  except DivergenceError as e:
    ckpt.close()  # finishes and verifies the last (finite) save
    last = (ckpt.all_steps() or [None])[-1]
    kept = (f'the last checkpoint, step {last}, holds finite values and was kept' if last
            else 'no checkpoint was written')
    raise DivergenceError(
        f'{e}; {kept} ({ckpt.directory}). Lower config.optimizer.lr (now '
        f'{config.optimizer.lr}) or set config.optimizer.grad_clip and run again: it resumes '
        'from that checkpoint.') from None
  except Exception as e:
    if lost_peer(e):  # a peer is gone: collectives (finishing a save) would wait for it
      ckpt.abandon()
    raise
  finally:
    ckpt.close()
    metrics.close()
    for msg in ckpt.messages:
      say(f'warning: {msg}')
  if step == total and not last:  # resumed at the end: evaluate the restored state
    last = {'step': step, **evaluate(eval_step, ts, test_pipe, to_global)}
    if last['test_accuracy'] >= best.get('best_test_accuracy', -1.0):
      best = {'best_test_accuracy': last['test_accuracy'], 'best_step': step}
    last.update(best)
  return {**last, 'step': step, 'stopped': step < total, **report}
