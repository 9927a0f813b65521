"""The one training loop: sharded jitted steps, evaluation, records,
checkpoints and resume, for one run or for K runs trained side by side.

It trains a *group*: K runs (``Member``) of one ``Run`` whose configs differ
only in traced values (seed, learning rate, weight decay, a
parameterization's ``traced`` options). K = 1 is an ordinary run
(``train_and_evaluate``); K > 1 stacks the members' train states along a
leading axis and ``jax.vmap``s the same step over it (``pemn_jax.sweep``).
Each member's directory, checkpoints, records and results are its own. The
safety rules (locks, config checks on resume, verified checkpoints,
divergence, signals): docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax.config import ConfigError, validate
from pemn_jax.data.prefetch import Prefetcher
from pemn_jax.params.base import Parameterization
from pemn_jax.pytrees import all_finite
from pemn_jax.train.checkpoint import Checkpointer, CheckpointSaveError
from pemn_jax.train.multihost import lost_peer
from pemn_jax.train.optim import make_schedule, set_hyperparams
from pemn_jax.train.run import Run, check_same_config, storage_report
from pemn_jax.train.sharding import (
  ShardingError,
  bytes_per_device,
  device_memory_limit,
  host_memory_available,
)
from pemn_jax.train.step import eval_batch, eval_sums, make_train_step
from pemn_jax.train.tracking import DivergenceError, Tracker
from pemn_jax.train.workdir import WorkdirLock, prepare

__all__ = ['DivergenceError', 'Member', 'Progress', 'compile_train_step', 'jit_steps',
           'state_layout', 'step_functions', 'train', 'train_and_evaluate']


@dataclasses.dataclass
class Member:
  """One run the loop trains: its directory, config and parameterization
  (built on the group's ``Run`` model), and how messages name it."""
  workdir: str
  config: Any
  param: Parameterization
  label: str = ''


class Progress:
  """What the loop prints (process 0): a single run's lines. A sweep passes
  its own (``pemn_jax.sweep``)."""

  def __init__(self, say):
    self.say = say

  def start(self, run: Run, members: list[Member], start: int):
    if start:
      return
    r, c = storage_report(run.param), run.config
    self.say(f'{c.model} x {c.param.name}: N={r["num_params"]} trainable={r["trainable"]} '
             f'model_bytes={r["model_bytes"]} dense_bytes={r["dense_bytes"]} steps={run.total} '
             f'devices={jax.device_count()} processes={jax.process_count()} '
             f'{run.layout.describe()}')

  def log(self, step: int, total: int, records: list[dict], eta: float):
    rec = records[0]
    extra = ''.join(f' {k} {v:.4g}' for k, v in rec.items() if k not in _STANDARD)
    self.say(f'step {step}/{total} loss {rec["loss"]:.4f} acc {rec["accuracy"]:.4f} '
             f'lr {rec["lr"]:.3g}{extra} {rec["images_per_s"]:.0f} img/s eta {eta:.0f}s')

  def evaluated(self, step: int, lasts: list[dict]):
    r = lasts[0]
    self.say(f'eval step {step}: test accuracy {r["test_accuracy"]:.4f} test loss '
             f'{r["test_loss"]:.4f} (best {r["best_test_accuracy"]:.4f} at step {r["best_step"]})')


_STANDARD = ('step', 'loss', 'accuracy', 'lr', 'images_per_s', 'trainable', 'model_bytes')


class StopSignals:
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
    workdir's checkpoints (``pemn_jax.train.run.restore``).
  Raises:
    ConfigError, DataError, CheckpointError, WorkdirError, DivergenceError.
  """
  validate(config)
  run = Run.build(config, model)  # first: a config that cannot be built leaves no workdir
  workdir = prepare(workdir)
  with WorkdirLock(workdir) as lock:
    if lock.unsupported:
      print(f'warning: {workdir} cannot be locked ({lock.unsupported}); make sure no other run '
            'uses it', flush=True)
    return train(run, [Member(workdir, config, run.param)])[0]


def _say(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def train(run: Run, members: list[Member], say=None, progress: Progress | None = None
          ) -> list[dict]:
  """Trains ``members`` side by side, each resuming from its checkpoints.

  Members resuming from different steps (e.g. one whose newest checkpoint
  was corrupt) continue as separate groups, one after another.

  Args:
    run: what the members share (``Run.build`` of the first one's config).
    members: runs of ``run`` differing only in traced values; their cadence
      keys (lengths, logging, evaluation, checkpoints) are the first one's.
    say: messages (default: printed by process 0).
    progress: what to print at start, log and evaluation steps (default:
      ``Progress(say)``).
  Returns:
    Each member's result (``train_and_evaluate``'s); ``stopped`` is True for
    those a signal or ``stop_at_step`` stopped before the end.
  Raises:
    ConfigError, DataError, CheckpointError, DivergenceError.
  """
  say = say or _say
  progress = progress or Progress(say)
  cfg = members[0].config
  ckpts = [Checkpointer(m.workdir, cfg.keep_checkpoints, cfg.verify_checkpoints, writer=True)
           for m in members]
  trackers = [Tracker(m.workdir, storage_report(m.param), make_schedule(
      m.config.optimizer, run.total, run.pipe.steps_per_epoch), cfg.batch_size,
      jax.process_index() == 0, m.label) for m in members]
  # One member: laid out per config.sharding; stacked members: replicated.
  one, shardings = state_layout(run, stacked=len(members) > 1)

  def warn(ck, label=''):
    for msg in ck.messages:
      say(f'warning: {label + ": " if label else ""}{msg}')
    ck.messages.clear()

  try:
    restored = []
    for m, ck in zip(members, ckpts, strict=True):
      if ck.all_steps():
        check_same_config(ck, m.config, m.workdir)
      restored.append(ck.restore_latest(one) if ck.all_steps() else (0, None, None))
      warn(ck, m.label)
    starts = sorted({s for s, _, _ in restored})
    if len(starts) > 1:
      say(f'variants resume from steps {starts}: continuing them as {len(starts)} groups')
    results: dict[int, dict] = {}
    for start in starts:
      idx = [i for i, (s, _, _) in enumerate(restored) if s == start]
      if any(r['stopped'] for r in results.values()):  # a signal stops the rest too
        results.update({i: trackers[i].result(start, run.total) for i in idx})
        continue
      group = _Group(run, [members[i] for i in idx], [ckpts[i] for i in idx],
                     [trackers[i] for i in idx], shardings, say, progress)
      results.update(zip(idx, group.fit(start, [restored[i] for i in idx]), strict=True))
    return [results[i] for i in range(len(members))]
  finally:  # every member closed, even if one's last save fails (its error is raised)
    failed = None
    for ck, tr in zip(ckpts, trackers, strict=True):
      try:
        ck.close()
      except CheckpointSaveError as e:
        failed = failed or e
      warn(ck)
      tr.close()
    if failed is not None and sys.exc_info()[1] is None:
      raise failed


def step_functions(run: Run, stacked: bool = False):
  """A run's train and evaluation steps, not jitted (``jax.jit`` or
  ``jax.export`` them; the loop jits them with its shardings).

  Args:
    run: the run.
    stacked: vmapped over a leading axis of stacked train states and
      hyperparameters (a sweep's group); stacked members generate their
      params replicated (per-device generation is a single run's layout).
  Returns:
    ``train(ts, hyper, images, labels, boxes, step) -> (ts, metrics)`` and
    ``evaluate(ts, hyper, images, labels, weights) -> (correct, count,
    loss)``: images uint8 as the pipelines give them (``boxes``: their erase
    boxes, or None), normalized inside; ``hyper``: ``{}`` for a single run.
  """
  model, dtype = run.model, run.config.dtype
  generate = None if stacked else run.layout.materialize

  def train(ts, h, images, labels, boxes, step):
    param = run.param.with_hyperparams(h)
    # the step's key derived inside the step: one dispatch per step, not two
    rng = jax.random.fold_in(jax.random.key(ts.seed), step)
    # uint8 batches from the host (a quarter of float32's traffic), normalized here
    return make_train_step(model, param, run.tx, generate, dtype, run.config.label_smoothing)(
        ts, run.pipe.normalize(images, boxes), labels, rng)

  def evaluate(ts, h, images, labels, weights):
    param = run.param.with_hyperparams(h)
    make = generate or (lambda p, *a: p.materialize(*a))
    return eval_batch(model, lambda rng: make(param, ts.state, ts.seed, rng), ts.model_state,
                      run.test_pipe.normalize(images), labels, weights,
                      param.eval_rngs(ts.seed), dtype)

  if stacked:
    return _stacked_train(train), jax.vmap(evaluate, in_axes=(0, 0, None, None, None))
  return train, evaluate


def _stacked_train(train):
  """``train`` vmapped over stacked members, the batch shared. Chosen at
  lowering: on CPU each member gets its own view of the (uint8) batch, since
  XLA:CPU otherwise turns a shared-input layer into one matmul over every
  member's weights and first copies all of them transposed (measured 6% of
  the quickstart's 8-member step); elsewhere one shared-input matmul."""
  shared = jax.vmap(train, in_axes=(0, 0, None, None, None, None))
  own = jax.vmap(train, in_axes=(0, 0, 0, None, None, None))

  def per_member(ts, h, images, labels, boxes, step):
    k = jax.tree.leaves(ts)[0].shape[0]
    return own(ts, h, jnp.broadcast_to(images, (k, *images.shape)), labels, boxes, step)

  return lambda *args: jax.lax.platform_dependent(*args, cpu=per_member, default=shared)


def state_layout(run: Run, stacked: bool = False):
  """One member's train state as the loop lays it out: ``(abstract state
  carrying its shardings, shardings)``; per ``config.sharding`` for a single
  run, replicated for stacked members.

  Raises:
    ConfigError: a sharding rule that does not fit the state.
  """
  one = jax.eval_shape(run.init_state, jax.random.key(0), np.uint32(0))
  try:
    shardings = (jax.tree.map(lambda _: run.layout.replicated, one) if stacked else
                 run.layout.state_shardings(one))
  except ShardingError as e:
    raise ConfigError(str(e)) from None
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), one,
                      shardings), shardings


def jit_steps(run: Run, shardings, stacked: bool = False):
  """``step_functions`` jitted as the loop runs them: the train state laid
  out per ``shardings`` (and donated), batches split over the mesh."""
  train_one, eval_one = step_functions(run, stacked)
  repl, data = run.layout.replicated, run.layout.batch
  train_step = jax.jit(train_one, in_shardings=(shardings, repl, data, data, data, repl),
                       out_shardings=(shardings, repl), donate_argnums=0)
  eval_step = jax.jit(eval_one, in_shardings=(shardings, repl, data, data, data),
                      out_shardings=repl)
  return train_step, eval_step


def compile_train_step(run: Run, compiler_options: dict | None = None):
  """A single run's train step compiled at its global batch on its mesh, as
  the loop runs it (nothing is allocated): ``memory_analysis()`` gives its
  per-device memory, ``cost_analysis()`` its FLOPs.

  Args:
    run: the run (its pipeline gives one batch's shapes).
    compiler_options: XLA options (e.g. ``{'xla_backend_optimization_level':
      0}``: a CPU compile ~3x faster, the same buffer assignment).
  Returns:
    The ``jax.stages.Compiled`` step.
  """
  ts, shardings = state_layout(run)
  batch = [None if a is None else jax.ShapeDtypeStruct(
      (run.config.batch_size, *a.shape[1:]), a.dtype) for a in run.pipe.raw_batch(0)]
  return jit_steps(run, shardings)[0].lower(ts, {}, *batch, np.uint32(0)).compile(
      compiler_options)


def _shared_host_memory(device_limit: int | None) -> int | None:
  """The host memory this process can still use where its devices share it
  (CPU devices, whose backend gives no per-device limit); None elsewhere."""
  if device_limit is not None or jax.local_devices()[0].platform != 'cpu':
    return None
  return host_memory_available()


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


class _Group:
  """Members trained as one compiled step (vmapped when more than one)."""

  def __init__(self, run, members, ckpts, trackers, shardings, say, progress):
    self.run, self.members, self.ckpts, self.trackers = run, members, ckpts, trackers
    self.say, self.progress, self.k = say, progress, len(members)
    self.stacked, self.config, self.shardings = self.k > 1, members[0].config, shardings
    self.hyper = (_stack([m.param.hyperparams() for m in members])
                  if self.stacked and run.param.hyperparams() else {})

  def _values(self, get, dtype):
    values = np.array([get(m.config) for m in self.members], dtype)
    return values if self.stacked else values[0]

  def _init(self):
    run = self.run

    def init(seed, lr, wd):
      ts = run.init_state(jax.random.key(seed), seed)
      return ts.replace(opt_state=set_hyperparams(ts.opt_state, learning_rate=lr,
                                                  weight_decay=wd))
    return jax.vmap(init) if self.stacked else init

  def _initial_state(self, start, restored):
    init = self._init()
    seeds = self._values(lambda c: int(c.seed) & 0xFFFFFFFF, np.uint32)
    lrs = self._values(lambda c: float(c.optimizer.lr), np.float32)
    wds = self._values(lambda c: float(c.optimizer.weight_decay), np.float32)
    abstract = jax.eval_shape(init, seeds, lrs, wds)
    need, limit = bytes_per_device(abstract, self.shardings), device_memory_limit()
    host = len(jax.local_devices()) * need  # CPU devices share the host's memory
    free = _shared_host_memory(limit)
    if free is not None and host > free:
      raise ConfigError(
          f'the train state needs {host / 2**20:,.0f} MiB, more than this host has available '
          f'({free / 2**20:,.0f} MiB for this process): it cannot train here. Shrink the model '
          '(config.model_kwargs) or the sweep, free memory, or train on accelerators')
    if limit is not None and need > limit:
      raise ConfigError(
          f'the train state needs {need / 2**20:.1f} MiB per device on the mesh '
          f'{dict(self.run.layout.mesh.shape)} with config.sharding.state='
          f'{self.config.sharding.state!r}, but a device holds {limit / 2**20:.1f} MiB: use more '
          "devices (config.mesh) or shard the state (config.sharding.state='fsdp' with "
          'config.mesh.fsdp > 1)')
    if not start:
      return jax.jit(init, out_shardings=self.shardings)(seeds, lrs, wds)
    states = [s for _, s, _ in restored]
    ts = jax.device_put(_stack(states), self.run.layout.replicated) if self.stacked else states[0]
    # optimizer.lr may change on resume: the rate held in the optimizer state
    # follows it (inside jit: the state may span processes).
    return jax.jit(lambda t, lr: t.replace(opt_state=set_hyperparams(t.opt_state,
                                                                     learning_rate=lr)),
                   in_shardings=(self.shardings, self.run.layout.replicated),
                   out_shardings=self.shardings, donate_argnums=0)(ts, lrs)

  def _check_step_memory(self, train_step, ts, args):
    """On CPU, where the devices share the host's memory: the compiled train
    step's buffers beyond the train state and the batch (activations,
    gradients) must fit what the host has free, or the run would be killed
    in its first step; refused naming config.batch_size. The step compiled
    here for ``args`` (the first step's) is the one the loop then runs."""
    free = _shared_host_memory(device_memory_limit())
    if free is None:
      return
    ma = train_step.lower(ts, self.hyper, *args).compile().memory_analysis()
    if ma is None:
      return
    need = len(jax.local_devices()) * (ma.temp_size_in_bytes + ma.output_size_in_bytes
                                       - ma.alias_size_in_bytes)
    if need > free:
      raise ConfigError(
          f'a train step at config.batch_size={self.config.batch_size} needs '
          f'{need / 2**20:,.0f} MiB beyond the train state and the batch (activations, '
          f'gradients), more than this host has available ({free / 2**20:,.0f} MiB for this '
          'process): lower config.batch_size, shrink the model, or free memory')

  def _member_metrics(self, ms, i):
    return [{n: np.reshape(v, (-1,))[i] for n, v in x.items()} for x in ms]

  def _evaluate(self, eval_step, ts, step, write=True) -> list[dict]:
    correct, count, loss = (np.reshape(x, (-1,)) for x in eval_sums(
        eval_step, self.run.test_pipe, ts, self.hyper, batch_sharding=self.run.layout.batch))
    return [tr.evaluated(step, float(correct[i] / count[i]), float(loss[i] / count[i]), write)
            for i, tr in enumerate(self.trackers)]

  def fit(self, start: int, restored) -> list[dict]:
    run, cfg, say = self.run, self.config, self.say
    total = run.total
    if start > total:
      where = self.members[0].workdir if not self.stacked else 'the variants\' workdirs'
      raise ConfigError(f'the checkpoint in {where} is at step {start}, beyond this run\'s '
                        f'{total} steps (config.num_steps/num_epochs): raise them to continue, '
                        'or use another --workdir')
    for tr, (_, _, meta) in zip(self.trackers, restored, strict=True):
      tr.resume(start, meta)
    if start:
      for m, ck in zip(self.members, self.ckpts, strict=True):
        say(f'resumed {m.label + " " if m.label else ""}from step {start} ({ck.directory})')
    ts = self._initial_state(start, restored)
    train_step, eval_step = jit_steps(run, self.shardings, self.stacked)
    self.progress.start(run, self.members, start)
    end = min(total, cfg.stop_at_step) if cfg.stop_at_step else total
    batch = run.layout.batch

    def step_inputs(s):  # the inputs of step s: on a background thread with config.prefetch
      return (*(None if a is None else jax.make_array_from_process_local_data(batch, a)
                for a in run.pipe.raw_batch(s)), np.uint32(s))

    acc, t_last, step, evaluated = [], time.time(), start, False
    try:
      with StopSignals() as stop, Prefetcher(step_inputs, range(start, end),
                                             cfg.prefetch) as inputs:
        while step < end:
          args = next(inputs)
          if step == start:
            self._check_step_memory(train_step, ts, args)
          ts, m = train_step(ts, self.hyper, *args)
          step += 1
          for ck in self.ckpts:  # a failed background save stops the run now
            ck.poll()
          acc.append(m)
          if step % cfg.log_every == 0 or step == end:
            ms, dt = jax.device_get(acc), time.time() - t_last
            recs = [tr.record(step, self._member_metrics(ms, i), dt)
                    for i, tr in enumerate(self.trackers)]
            self.progress.log(step, total, recs, (total - step) * dt / len(ms))
            acc, t_last = [], time.time()
          if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            self.progress.evaluated(step, self._evaluate(eval_step, ts, step))
            evaluated, t_last = True, time.time()
          stopping = stop.requested(step)
          if step % cfg.checkpoint_every == 0 or step == end or stopping:
            self._save(ts, step)
          if stopping:
            for ck in self.ckpts:
              ck.wait()
            say(f'received signal {stop.signum}: checkpoint saved at step {step}, exiting')
            break
    except DivergenceError as e:
      raise self._diverged(e) from None
    except Exception as e:
      if lost_peer(e):  # a peer is gone: collectives (finishing a save) would wait for it
        for ck in self.ckpts:
          ck.abandon()
      raise
    if step == total and not evaluated:  # resumed at the end: evaluate the restored state
      self._evaluate(eval_step, ts, step, write=False)
    results = [tr.result(step, total) for tr in self.trackers]
    # (stacked: each member's slice of the state, not its optimizer state, taken on the host)
    mine = jax.device_get((ts.state, ts.seed)) if self.stacked else (ts.state, ts.seed)
    for i, (m, r) in enumerate(zip(self.members, results, strict=True)):
      one = jax.tree.map(lambda x, i=i: x[i], mine) if self.stacked else mine
      r['goals'] = m.param.goals(*one)  # what was asked, and whether it was met
    return results

  def _save(self, ts, step: int):
    if self.stacked:  # (replicated, one process) checked and sliced on the host: sliced on
      # device, the slices of every leaf and member would compile as one program (~1 s)
      ts = jax.device_get(ts)
    if not all_finite((ts.state, ts.opt_state, ts.model_state)):
      raise self.trackers[0].diverged(step, 'finite, but the state is not')
    ones = ([jax.device_put(jax.tree.map(lambda x, i=i: x[i], ts), self.run.layout.replicated)
             for i in range(self.k)] if self.stacked else [ts])
    for m, ck, tr, one in zip(self.members, self.ckpts, self.trackers, ones, strict=True):
      ck.save(step, one, self.run.meta(m.config, step, tr.best), force=True)

  def _diverged(self, e: DivergenceError) -> DivergenceError:
    for ck in self.ckpts:
      ck.close()  # finishes and verifies the last (finite) save
    lasts = [(ck.all_steps() or [None])[-1] for ck in self.ckpts]
    where = self.ckpts[0].directory if len(self.ckpts) == 1 else 'each variant\'s checkpoints'
    if all(s is None for s in lasts):
      kept, again = f'no checkpoint was written ({where})', 'run again'
    else:
      kept = (f'the last checkpoint, step {lasts[0]}, holds finite values and was kept ({where})'
              if len(lasts) == 1 else
              f'the last checkpoints, steps {lasts}, hold finite values and were kept')
      again = 'run again: it resumes from that checkpoint'
    return DivergenceError(f'{e}; {kept}. Lower config.optimizer.lr (now '
                           f'{self.config.optimizer.lr}) or set config.optimizer.grad_clip and '
                           f'{again}.')
