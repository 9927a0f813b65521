"""A run: what it is made of (built from its config), what its checkpoints
record, and how its trained model is restored.

Everything that starts from a config or a run directory stands on this
module: the trainer and the sweeps build a ``Run`` (``Run.build``) and
train it (``train.loop``); ``export``, ``evaluate`` and ``evolve`` take a
run's trained model from ``restore`` -- its newest good checkpoint, read
without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import optax

from pemn_jax import config as config_lib
from pemn_jax import models
from pemn_jax import params as param_lib
from pemn_jax.config import RESUMABLE_KEYS, ConfigError, config_differences, without_legacy
from pemn_jax.data import sources
from pemn_jax.data.pipeline import Pipeline
from pemn_jax.kernels import conv
from pemn_jax.pytrees import flatten
from pemn_jax.train.checkpoint import Checkpointer, CheckpointError, replicated_sharding
from pemn_jax.train.optim import make_optimizer, with_pruning
from pemn_jax.train.sharding import Layout, ShardingError
from pemn_jax.train.step import TrainState, create_train_state


def data_seed(config) -> int:
  """The seed of the training data order and augmentation draws."""
  return config.seed if config.data_seed is None else config.data_seed


def make_model(config, num_classes: int):
  """``config.model`` (a registry name or import path) built with its kwargs.

  Raises:
    ConfigError: naming ``config.model`` or ``config.model_kwargs``.
  """
  kwargs = config.model_kwargs.to_dict() if hasattr(config.model_kwargs, 'to_dict') \
      else dict(config.model_kwargs)
  try:
    return models.get(config.model, num_classes=num_classes, **kwargs)
  except ValueError as e:
    which = (f'config.model_kwargs={kwargs!r}' if kwargs and 'bad options' in str(e)
             else f'config.model={config.model!r}')
    raise ConfigError(f'{which}: {e}') from None


def make_param(config, model, input_shape, total_steps: int = 1) -> param_lib.Parameterization:
  """``config.param`` built on ``model``'s params (ConfigError naming it, or
  the model's config keys when the model cannot be built on ``input_shape``
  or has an empty parameter: a zero or negative width, say)."""
  kwargs = dict(config.get('model_kwargs') or {})
  which = f'config.model_kwargs={kwargs!r}' if kwargs else f'config.model={config.model!r}'
  try:  # (abstract: nothing is allocated)
    target = models.abstract_params(model, tuple(input_shape))
  except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:
    first = str(e).strip().split('\n')[0][:300]
    raise ConfigError(f'{which}: model {config.model!r} cannot be built on inputs of shape '
                      f'{tuple(input_shape)}: {type(e).__name__}: {first}') from None
  empty = [(k, x.shape) for k, x in flatten(target).items() if 0 in x.shape]
  if empty:
    raise ConfigError(f'{which}: model {config.model!r} has empty parameters (a zero width?): '
                      + ', '.join(f'{k} of shape {s}' for k, s in empty[:3]))
  try:
    return param_lib.build(config.param, target, model=model, total_steps=total_steps)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.param: {e}') from e


def storage_report(param: param_lib.Parameterization) -> dict:
  """Sizes of the model: dense float32 bytes, a compact file's bytes, N, trainable."""
  bits = param.storage_bits()
  return {'dense_bytes': 4 * param.num_params,
          'model_bytes': int(math.ceil(sum(bits.values()) / 8)),
          'num_params': param.num_params, 'trainable': param.num_trainable()}


@dataclasses.dataclass
class Run:
  """What a training run is made of, built from its config (``Run.build``):
  the trainer and the sweeps start from it."""
  config: Any
  layout: Layout
  train_ds: Any
  pipe: Pipeline            # training batches (order: config.data_seed, else config.seed)
  test_pipe: Pipeline       # evaluation batches (padded to the devices)
  model: Any
  param: param_lib.Parameterization
  total: int                # training steps
  tx: optax.GradientTransformation  # the optimizer (pruning wrapper included)
  sched: Any                # learning rate of step

  @classmethod
  def build(cls, config, model=None, decay: bool | None = None, datasets=None) -> Run:
    """Builds a run's data pipelines, model, parameterization and optimizer.

    Args:
      config: a validated training config.
      model: optionally the model itself (a Linen module or
        ``models.NNXModel``); by default ``make_model(config)``.
      decay: include the weight-decay term in the optimizer (``make_optimizer``).
      datasets: ``(train, test)`` Datasets to use instead of ``config.dataset``'s
        (e.g. ``sources.generated``).
    Returns:
      The ``Run``.
    Raises:
      ConfigError, DataError.
    """
    try:
      layout = Layout.from_config(config)
    except ShardingError as e:
      raise ConfigError(str(e)) from None
    n = jax.device_count()
    if config.batch_size % n:
      raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by the '
                        f'{n} devices')
    train_ds, test_ds = datasets or _load_datasets(config)
    pidx, pcount = jax.process_index(), jax.process_count()
    try:
      pipe = Pipeline(train_ds, config.batch_size, data_seed(config), config.augment, pidx,
                      pcount, config.train_limit, config.augment_options.to_dict())
    except ValueError as e:
      raise ConfigError(f'config.batch_size={config.batch_size}: {e}') from None
    # Evaluation pads its batches (padding weighs 0): round up to the devices.
    eval_size = -(-config.eval_batch_size // n) * n
    test_pipe = Pipeline(test_ds, eval_size, config.seed, '', pidx, pcount, config.test_limit,
                         training=False)
    model = make_model(config, train_ds.num_classes) if model is None else model
    total = config.num_steps or max(1, int(config.num_epochs * pipe.steps_per_epoch))
    param = make_param(config, model, train_ds.image_shape, total)
    try:
      layout.resolve(param)
    except (ValueError, TypeError) as e:
      raise ConfigError(f'config.param: {e}') from e
    tx, sched = make_optimizer(config.optimizer, total, pipe.steps_per_epoch, decay)
    tx = with_pruning(tx, config.prune, total, config.seed, param)
    return cls(config, layout, train_ds, pipe, test_pipe, model, param, total, tx, sched)

  def init_state(self, key, seed) -> TrainState:
    """The initial ``TrainState`` (not jitted; ``seed`` may be traced)."""
    return create_train_state(self.param, self.tx, key,
                              models.init_model_state(self.model, self.train_ds.image_shape),
                              seed)

  def meta(self, config, step: int, best: dict) -> dict:
    """The metadata a checkpoint of this run (``config``: a member's) records."""
    return {'step': step, 'config': config.to_dict(), 'best': best,
            'num_classes': self.train_ds.num_classes,
            'input_shape': list(self.train_ds.image_shape)}


def activation_bytes(config, variants: int = 1) -> int | None:
  """What one training step of ``config`` makes in activations, estimated
  from abstract shapes only (JAX's backend is not started): the outputs of
  every operation of the model's forward pass on one example
  (``models.cost.measure``) x the batch size x ``variants``.

  Returns:
    Bytes, or None where the model cannot be built from the config (the run
    then says why).
  """
  try:
    model = make_model(config, num_classes=10)  # the classifier's width barely counts
    shape = sources.image_shape(config.dataset, config.get('image_size'))
    with conv.forced('xla'):  # 'auto' would ask for the devices, starting the backend
      per_example = models.cost.measure(model, shape)['activation_bytes']
  except Exception:  # noqa: BLE001 - an estimate; the run reports a bad config itself
    return None
  return per_example * config.batch_size * variants


def load_dataset(config, split: str) -> sources.Dataset:
  """``split`` of a config's dataset (``config.data_dir``, ``image_size``, ...)."""
  return sources.load(config.dataset, split, config.data_dir, config.source_dir,
                      image_size=config.get('image_size'), workers=config.get('data_workers'))


def _load_datasets(config):
  """(train, test) datasets; in a multi-process job process 0 prepares them first."""
  def load(split):
    return load_dataset(config, split)

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      load('train'), load('test')
    multihost_utils.sync_global_devices('pemn_jax:data_ready')
  return load('train'), load('test')


def check_same_config(ckpt: Checkpointer, config, workdir: str):
  """ConfigError when ``workdir``'s checkpoints were written with another
  config (``RESUMABLE_KEYS`` aside), naming the differing keys."""
  stored = ckpt.stored_config()
  diffs = config_differences(stored, config.to_dict()) if stored is not None else []
  if diffs:
    raise ConfigError(f'{workdir} holds checkpoints of another config; differing keys: '
                      + '; '.join(diffs[:10]) + '. Only these keys may change on resume: '
                      + ', '.join(RESUMABLE_KEYS) + '. Use another --workdir for a new config.')


@dataclasses.dataclass
class Restored:
  """A run's trained model, from one of its checkpoints (``restore``)."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  meta: dict
  model: Any
  param: param_lib.Parameterization
  train_state: TrainState   # its opt_state is None: the optimizer state is not read

  @property
  def num_classes(self) -> int:
    return int(self.meta['num_classes'])

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.meta['input_shape'])

  def params(self):
    """The trained params (materialized)."""
    ts = self.train_state
    return jax.jit(self.param.materialize)(ts.state, ts.seed)


def restore(workdir: str, step: int | None = None, say=None) -> Restored:
  """A run's trained model from its newest good checkpoint (or ``step``),
  read without its optimizer state (no optimizer is built), onto this
  process's devices whatever mesh saved it. Steps that fail their checks are
  skipped (and left on disk) and ``say`` is told which step was used.

  Args:
    workdir: the run's directory.
    step: a particular step (default: the newest good one).
    say: where to report a skipped step (default: nowhere).
  Returns:
    The ``Restored`` run.
  Raises:
    CheckpointError: no checkpoint, or none that restores.
  """
  ckpt = Checkpointer(workdir, keep=1_000_000)
  try:
    steps = ckpt.all_steps() if step is None else [step]
    if not steps:
      raise CheckpointError(f'no checkpoint in {ckpt.directory}: train first (pemn_jax.main)')
    failures = []
    for s in reversed(steps):
      try:
        out = _restore_step(ckpt, s, workdir)
      except (CheckpointError, ConfigError) as e:
        failures.append(f'{e}')
        continue
      if failures and say is not None:
        say(f'note: the newest checkpoint(s) of {workdir} could not be used ('
            + '; '.join(failures[:3]) + f'); using step {s}')
      return out
    raise CheckpointError('; '.join(failures[:3]))
  finally:
    ckpt.close()


def _restore_step(ckpt: Checkpointer, step: int, workdir: str) -> Restored:
  meta = ckpt.restore_meta(step)
  if 'num_classes' not in meta:
    raise CheckpointError(f'checkpoint step {step} in {ckpt.directory} has no model metadata '
                          '(written by an older pemn_jax)')
  config = ml_collections.ConfigDict(without_legacy(meta['config']))
  config_lib.import_modules(config.get('imports', ''))  # what registered the run's model / method
  model = make_model(config, meta['num_classes'])
  param = make_param(config, model, meta['input_shape'])
  shapes = (jax.eval_shape(param.init, jax.random.key(0)),
            models.abstract_variables(model, tuple(meta['input_shape'])))
  state, variables = shapes
  abstract = TrainState(step=jax.ShapeDtypeStruct((), 'int32'), state=state, opt_state=None,
                        model_state={c: v for c, v in variables.items() if c != 'params'},
                        seed=jax.ShapeDtypeStruct((), 'uint32'))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=replicated_sharding()), abstract)
  ts, meta = ckpt.restore(step, abstract, partial=True)
  return Restored(workdir, step, config, meta, model, param, ts)
