"""Training a sweep: each group of variants as one vmapped, jitted step.

The variants of a group are stacked along a leading axis: their train states
(trainable state, optimizer state with its learning rate and weight decay,
batch statistics, seed) and their parameterization hyperparameters
(``Parameterization.hyperparams``: e.g. edge-popup's kept counts). One
``jax.vmap`` of the trainer's own step (``train.step.make_train_step``) over
that axis trains them all on the same batch; the trainer's own evaluation
(``train.step.eval_batch``) is vmapped the same way.

Each variant is an ordinary run directory ``WORKDIR/<variant>/``: its config
(a complete, standalone config: ``python -m pemn_jax.main`` with it trains
the same variant alone), its checkpoints, metrics.jsonl and TensorBoard
events, and ``result.json`` once finished. ``pemn_jax.export`` and
``pemn_jax.evaluate`` work on it as on any run. A restarted sweep skips the
finished variants and resumes the others from their checkpoints (variants
whose newest checkpoints are at different steps continue as separate
groups).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import numpy as np

from pemn_jax import models
from pemn_jax import params as P
from pemn_jax.config import ConfigError, config_differences
from pemn_jax.sweep.spec import Variant
from pemn_jax.train.checkpoint import Checkpointer, all_finite
from pemn_jax.train.loop import (
  DivergenceError,
  Metrics,
  eval_sums,
  global_batch,
  setup,
  storage_report,
)
from pemn_jax.train.optim import make_schedule, set_hyperparams
from pemn_jax.train.step import eval_batch, make_train_step

RESULT = 'result.json'


def finished(workdir: str, variant: Variant) -> dict | None:
  """The variant's stored result, or None when it has not finished."""
  path = os.path.join(workdir, variant.name, RESULT)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  return out if out.get('config') == _plain(variant.config.to_dict()) else None


def _plain(tree):
  """As JSON stores it (tuples as lists)."""
  return json.loads(json.dumps(tree, default=str))


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _unstack(tree, k: int):
  return jax.tree.map(lambda x: x[k], tree)


def train_group(variants: list[Variant], workdir: str, say=print, progress=None) -> list[dict]:
  """Trains a group of variants (equal signatures) side by side.

  Args:
    variants: the group (``spec.group``); their configs differ in traced
      keys only.
    workdir: the sweep's directory (each variant in ``workdir/<name>``).
    say: progress output.
    progress: ``(step, group steps, last losses per variant) -> None``, called
      at each log step.
  Returns:
    Each variant's result (as written to its ``result.json``).
  Raises:
    ConfigError, DataError, CheckpointError, DivergenceError.
  """
  configs = [v.config for v in variants]
  base = configs[0]
  decay = any(float(c.optimizer.weight_decay) > 0 for c in configs)
  run = setup(base, decay=decay)
  model, param, tx, total, pipe = run.model, run.param, run.tx, run.total, run.pipe
  layout = run.layout
  repl, data_sharding = layout.replicated, layout.batch
  k = len(variants)
  # Per-variant values, computed in Python as a single run computes them.
  target = models.abstract_params(model, run.train_ds.image_shape)
  params = [param] + [P.build(c.param, target, model=model, total_steps=total)
                      for c in configs[1:]]
  scheds = [make_schedule(c.optimizer, total, pipe.steps_per_epoch) for c in configs]
  hyper = _stack([p.hyperparams() for p in params]) if param.hyperparams() else {}
  seeds = np.array([int(c.seed) & 0xFFFFFFFF for c in configs], np.uint32)
  lrs = np.array([float(c.optimizer.lr) for c in configs], np.float32)
  wds = np.array([float(c.optimizer.weight_decay) for c in configs], np.float32)
  reports = [storage_report(p) for p in params]

  def init_one(seed, lr, wd):
    ts = run.init_state(jax.random.key(seed), seed)
    return ts.replace(opt_state=set_hyperparams(ts.opt_state, learning_rate=lr, weight_decay=wd))

  init = jax.jit(jax.vmap(init_one), out_shardings=repl)
  abstract = jax.eval_shape(init, seeds, lrs, wds)

  dirs = [os.path.join(workdir, v.name) for v in variants]
  ckpts = [Checkpointer(d, base.keep_checkpoints, base.verify_checkpoints) for d in dirs]
  metrics = [Metrics(d, jax.process_index() == 0) for d in dirs]
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=repl),
                     abstract)
  start, best = 0, [{} for _ in variants]
  states = []
  for i, ck in enumerate(ckpts):
    step, state, meta = ck.restore_latest(one) if ck.all_steps() else (0, None, None)
    for msg in ck.messages:
      say(f'warning: {variants[i].name}: {msg}')
    ck.messages.clear()
    diffs = [] if meta is None else config_differences(meta.get('config', {}),
                                                       configs[i].to_dict())
    if diffs:
      raise ConfigError(f'{dirs[i]} holds checkpoints of another config (' + '; '.join(diffs[:5])
                        + '): move it away or use another --workdir')
    states.append((step, state, meta))
  steps = sorted({s for s, _, _ in states})
  if len(steps) > 1:  # e.g. a corrupt newest checkpoint of one variant: continue apart
    for ck in ckpts:
      ck.close()
    say(f'variants resume from steps {steps}: continuing them as {len(steps)} groups')
    out = {}
    for s in steps:
      part = [v for v, (t, _, _) in zip(variants, states, strict=True) if t == s]
      out.update({r['variant']: r for r in train_group(part, workdir, say, progress)})
    return [out[v.name] for v in variants]
  start = steps[0]
  if start:
    ts = jax.device_put(_stack([s for _, s, _ in states]), repl)
    best = [dict(m.get('best', {})) for _, _, m in states]
    for m in metrics:
      m.truncate_after(start)
  else:
    ts = init(seeds, lrs, wds)
  if start > total:
    raise ConfigError(f'the checkpoints are at step {start}, beyond the {total} steps')

  def step_one(ts, h, images, labels):
    rng = jax.random.fold_in(jax.random.key(ts.seed), ts.step)  # as the trainer's
    return make_train_step(model, param.with_hyperparams(h), tx)(ts, images, labels, rng)

  train_step = jax.jit(jax.vmap(step_one, in_axes=(0, 0, None, None)),
                       in_shardings=(repl, repl, data_sharding, data_sharding),
                       out_shardings=(repl, repl), donate_argnums=0)

  def eval_one(ts, h, images, labels, weights):
    p = param.with_hyperparams(h)
    return eval_batch(model, lambda rng: p.materialize(ts.state, ts.seed, rng), ts.model_state,
                      images, labels, weights, p.eval_rngs(ts.seed))

  eval_step = jax.jit(jax.vmap(eval_one, in_axes=(0, 0, None, None, None)),
                      in_shardings=(repl, repl, data_sharding, data_sharding, data_sharding),
                      out_shardings=repl)

  to_global = functools.partial(global_batch, data_sharding)

  def evaluate_all(ts):
    correct, count, loss = eval_sums(lambda t, *batch: eval_step(t, hyper, *batch), ts,
                                     run.test_pipe, to_global)
    return [{'test_accuracy': float(correct[i] / count[i]), 'test_loss': float(loss[i] / count[i])}
            for i in range(k)]

  if not start:
    say(f'group of {k}: {base.model} x {base.param.name}, N={reports[0]["num_params"]}, '
        f'{total} steps; variants: ' + ', '.join(v.name for v in variants))
  for m in metrics:
    m.open_tensorboard(start)
  last = [{} for _ in variants]
  t0, t_last, acc, step = time.time(), time.time(), [], start
  try:
    while step < total:
      images, labels = pipe.batch(step)
      ts, m = train_step(ts, hyper, *to_global(images, labels))
      step += 1
      acc.append(m)
      if step % base.log_every == 0 or step == total:
        ms = jax.device_get(acc)
        losses = np.array([x['loss'] for x in ms])  # (steps, k)
        bad = ~np.isfinite(losses)
        if bad.any():
          s, i = np.argwhere(bad)[0]
          raise DivergenceError(f'variant {variants[i].name} diverged: its loss is '
                                f'{losses[s, i]} at step {step - len(ms) + s + 1}')
        dt = time.time() - t_last
        for i in range(k):
          rec = {'step': step, 'loss': float(losses[:, i].mean()),
                 'accuracy': float(np.mean([x['accuracy'][i] for x in ms])),
                 **{n: float(ms[-1][n][i]) for n in ms[-1] if n not in ('loss', 'accuracy')},
                 'lr': float(scheds[i](step - 1)),
                 'images_per_s': len(ms) * base.batch_size / dt,
                 'trainable': reports[i]['trainable'], 'model_bytes': reports[i]['model_bytes']}
          metrics[i].write(rec)
        if progress is not None:
          progress(step, total, losses[-1])
        acc, t_last = [], time.time()
      if (base.eval_every and step % base.eval_every == 0) or step == total:
        results = evaluate_all(ts)
        for i, r in enumerate(results):
          if not math.isfinite(r['test_loss']):
            raise DivergenceError(f'variant {variants[i].name} diverged: test loss '
                                  f'{r["test_loss"]} at step {step}')
          if r['test_accuracy'] >= best[i].get('best_test_accuracy', -1.0):
            best[i] = {'best_test_accuracy': r['test_accuracy'], 'best_step': step}
          last[i] = {'step': step, **r, **best[i]}
          metrics[i].write(last[i])
        t_last = time.time()
      if step % base.checkpoint_every == 0 or step == total:
        if not all_finite((ts.state, ts.opt_state, ts.model_state)):
          raise DivergenceError(f'a variant\'s state is not finite at step {step}')
        for i, ck in enumerate(ckpts):
          ck.save(step, _unstack(ts, i), {
              'step': step, 'config': configs[i].to_dict(), 'best': best[i],
              'num_classes': run.train_ds.num_classes,
              'input_shape': list(run.train_ds.image_shape)}, force=True)
  finally:
    for ck in ckpts:
      ck.close()
      for msg in ck.messages:
        say(f'warning: {msg}')
    for m in metrics:
      m.close()
  wall = time.time() - t0
  if not last[0]:  # resumed at the end: evaluate the restored states
    for i, r in enumerate(evaluate_all(ts)):
      if r['test_accuracy'] >= best[i].get('best_test_accuracy', -1.0):
        best[i] = {'best_test_accuracy': r['test_accuracy'], 'best_step': step}
      last[i] = {'step': step, **r, **best[i]}
  out = []
  for i, v in enumerate(variants):
    res = {'variant': v.name, 'values': v.values, **last[i], **reports[i],
           'group_size': k, 'group_wall_s': wall, 'config': _plain(configs[i].to_dict())}
    if jax.process_index() == 0:
      tmp = os.path.join(dirs[i], RESULT + '.tmp')
      with open(tmp, 'w') as f:
        json.dump(res, f, indent=1, default=str)
      os.replace(tmp, os.path.join(dirs[i], RESULT))
    out.append(res)
  return out


def resume_step(workdir: str, variant: Variant) -> int:
  """The step a variant's newest checkpoint holds (0 when none)."""
  ck_dir = os.path.join(workdir, variant.name, 'checkpoints')
  if not os.path.isdir(ck_dir):
    return 0
  steps = [int(d) for d in os.listdir(ck_dir) if d.isdigit()]
  return max(steps, default=0)

