"""The training loop: sharded jitted steps, eval, metrics, checkpoints, resume.

The loop is method-agnostic: the config's ``param`` spec becomes a
parameterization and the step differentiates w.r.t. its state only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from pemn_jax import models
from pemn_jax import params as P
from pemn_jax.config import ConfigError, validate
from pemn_jax.data import sources
from pemn_jax.data.pipeline import Pipeline
from pemn_jax.train.checkpoint import Checkpointer
from pemn_jax.train.optim import make_optimizer, with_pruning
from pemn_jax.train.step import create_train_state, eval_batch, make_train_step


def make_mesh():
  n = jax.device_count()
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


class _Stop:
  """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly."""

  def __init__(self):
    self.signum = None
    self._old = {}

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


def evaluate(eval_step, ts, pipe: Pipeline, to_global):
  correct = total = loss = 0.0
  for images, labels, weights in pipe.eval_batches():
    out = eval_step(ts, *to_global(images, labels, weights))
    correct, total, loss = correct + out[0], total + out[1], loss + out[2]
  correct, total, loss = (float(x) for x in (correct, total, loss))
  return {'test_accuracy': correct / total, 'test_loss': loss / total}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per ``config`` in ``workdir`` (resuming from its checkpoints);
  returns the final metrics."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh()
  repl = NamedSharding(mesh, PS())
  data_sharding = NamedSharding(mesh, PS('data'))
  if config.batch_size % jax.device_count():
    raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by the '
                      f'{jax.device_count()} devices')
  if config.eval_batch_size % jax.device_count():
    raise ConfigError(f'config.eval_batch_size={config.eval_batch_size} is not divisible by the '
                      f'{jax.device_count()} devices')

  load = lambda split: sources.load(config.dataset, split, config.data_dir or None,  # noqa: E731
                                    config.source_dir or None)
  pidx, pcount = jax.process_index(), jax.process_count()
  if pcount > 1:  # process 0 prepares local datasets; the others wait, then read
    from jax.experimental import multihost_utils
    if pidx == 0:
      load('train'), load('test')
    multihost_utils.sync_global_devices('pemn_jax:data_ready')
  train_ds, test_ds = load('train'), load('test')
  pipe = Pipeline(train_ds, config.batch_size, config.seed, config.augment, pidx, pcount,
                  config.train_limit or None, config.augment_options.to_dict())
  test_pipe = Pipeline(test_ds, config.eval_batch_size, config.seed, '', pidx, pcount,
                       config.test_limit or None)

  model = models.get(config.model, num_classes=train_ds.num_classes,
                     **config.model_kwargs.to_dict())
  target = models.abstract_params(model, train_ds.image_shape)
  try:
    param = P.build(config.param, target)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.param: {e}') from e
  total = config.num_steps or max(1, int(config.num_epochs * pipe.steps_per_epoch))
  tx, sched = make_optimizer(config.optimizer, total, pipe.steps_per_epoch)
  tx = with_pruning(tx, config.prune, total, config.seed, param)

  init = jax.jit(lambda k: create_train_state(
      param, tx, k, models.init_model_state(model, train_ds.image_shape), config.seed),
      out_shardings=repl)
  ts = init(jax.random.key(config.seed))
  ckpt = Checkpointer(workdir, config.keep_checkpoints)
  start = ckpt.latest_step() or 0
  best = {}  # best test accuracy over evaluations (the PEMN reference reports it)
  if start:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), ts)
    ts, meta = ckpt.restore(start, abstract)
    best = dict(meta.get('best', {}))
    logging.info('resumed from %s at step %d', ckpt.directory, start)
    print(f'resumed from step {start} ({ckpt.directory})', flush=True)

  train_step = jax.jit(
      make_train_step(model, param, tx),
      in_shardings=(repl, data_sharding, data_sharding, repl),
      out_shardings=(repl, repl), donate_argnums=0)

  @jax.jit
  def eval_step(ts, images, labels, weights):
    return eval_batch(model, lambda rng: param.materialize(ts.state, ts.seed, rng),
                      ts.model_state, images, labels, weights, param.eval_rngs(ts.seed))

  def to_global(*arrays):
    return tuple(jax.make_array_from_process_local_data(data_sharding, np.asarray(a))
                 for a in arrays)

  report = storage_report(param)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  is_main = pidx == 0

  def write(record):
    if is_main:
      with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')

  if is_main and not start:
    print(f'{config.model} x {config.param.name}: N={report["num_params"]} trainable='
          f'{report["trainable"]} model_bytes={report["model_bytes"]} dense_bytes='
          f'{report["dense_bytes"]} steps={total} devices={jax.device_count()} '
          f'processes={pcount}', flush=True)
  end = min(total, config.stop_at_step) if config.stop_at_step else total
  acc_metrics, t_last, step = [], time.time(), start
  last = {}
  base_key = jax.random.key(config.seed)
  with _Stop() as stop:
    while step < end:
      images, labels = pipe.batch(step)
      ts, m = train_step(ts, *to_global(images, labels), jax.random.fold_in(base_key, step))
      step += 1
      acc_metrics.append(m)
      if step % config.log_every == 0 or step == end:
        ms = jax.device_get(acc_metrics)
        dt = time.time() - t_last
        rec = {'step': step, 'loss': float(np.mean([x['loss'] for x in ms])),
               'accuracy': float(np.mean([x['accuracy'] for x in ms])),
               'lr': float(sched(step - 1)), 'images_per_s': len(ms) * config.batch_size / dt,
               'trainable': report['trainable'], 'model_bytes': report['model_bytes']}
        eta = (total - step) * dt / len(ms)
        if is_main:
          print(f'step {step}/{total} loss {rec["loss"]:.4f} acc {rec["accuracy"]:.4f} '
                f'lr {rec["lr"]:.3g} {rec["images_per_s"]:.0f} img/s eta {eta:.0f}s', flush=True)
        write(rec)
        acc_metrics, t_last = [], time.time()
      if (config.eval_every and step % config.eval_every == 0) or step == total:
        last = {'step': step, **evaluate(eval_step, ts, test_pipe, to_global)}
        if last['test_accuracy'] >= best.get('best_test_accuracy', -1.0):
          best = {'best_test_accuracy': last['test_accuracy'], 'best_step': step}
        last.update(best)
        if is_main:
          print(f'eval step {step}: test accuracy {last["test_accuracy"]:.4f} test loss '
                f'{last["test_loss"]:.4f} (best {best["best_test_accuracy"]:.4f} at step '
                f'{best["best_step"]})', flush=True)
        write(last)
        t_last = time.time()
      if step % config.checkpoint_every == 0 or step == end or stop.signum is not None:
        ckpt.save(step, ts, {'step': step, 'config': config.to_dict(), 'best': best,
                             'num_classes': train_ds.num_classes,
                             'input_shape': list(train_ds.image_shape)}, force=True)
      if stop.signum is not None:
        ckpt.wait()
        print(f'received signal {stop.signum}: checkpoint saved at step {step}, exiting',
              flush=True)
        break
  ckpt.close()
  if step == total and not last:  # resumed at the end: evaluate the restored state
    last = {'step': step, **evaluate(eval_step, ts, test_pipe, to_global)}
    if last['test_accuracy'] >= best.get('best_test_accuracy', -1.0):
      best = {'best_test_accuracy': last['test_accuracy'], 'best_step': step}
    last.update(best)
  return {'step': step, 'stopped': step < total, **last, **report, '_state': ts}
