"""The config schema: defaults, and validation with errors that name the key."""

from __future__ import annotations

import math

import ml_collections

from pemn_jax import models
from pemn_jax.data import augment as aug
from pemn_jax.data.sources import DATASETS
from pemn_jax.train.optim import OPTIMIZERS, SCHEDULES
from pemn_jax.train.pruning import ALLOCATIONS, CRITERIA
from pemn_jax.train.sharding import ShardingError, check_config


class ConfigError(ValueError):
  """A config key or value that cannot be used."""


def base_config() -> ml_collections.ConfigDict:
  """Every key a training config has (configs/*.py start from this)."""
  c = ml_collections.ConfigDict()
  c.dataset = 'fashion_mnist'   # see pemn_jax.data.sources.DATASETS
  c.data_dir = ''               # TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.source_dir = ''             # local files to prepare from ('' = the dataset's usual place)
  c.train_limit = 0             # use only the first N training examples (0 = all)
  c.test_limit = 0              # evaluate on the first N test examples (0 = all)
  c.augment = ''                # ops: crop,flip,randaugment,jitter,erase; presets cifar, pemn
  c.augment_options = ml_collections.ConfigDict(
      {'ra_ops': 2, 'ra_magnitude': 12, 'jitter': 0.2, 'erase': 0.2})
  c.model = 'mlp'
  c.model_kwargs = ml_collections.ConfigDict()
  c.param = ml_collections.ConfigDict({'name': 'dense'})  # pemn_jax.params.build spec
  c.optimizer = ml_collections.ConfigDict({
      'name': 'adamw', 'lr': 1e-3, 'weight_decay': 0.0, 'momentum': 0.9, 'nesterov': False,
      'schedule': 'cosine', 'warmup_steps': 0, 'grad_clip': 0.0,
      'decay_epochs': 0.0})        # exponential schedule: lr * 0.1 ** (epoch / decay_epochs)
  # Pruning baselines (with param.name == 'dense'), pemn_jax/train/pruning.py:
  # criterion '' | magnitude (train -> prune at begin -> fine-tune) | gmp (cubic
  # ramp from begin to end) | magnitude_at_init | random; allocation uniform |
  # global | erk; skip_first keeps the first layer dense.
  c.prune = ml_collections.ConfigDict({
      'criterion': '', 'sparsity': 0.9, 'allocation': 'uniform', 'skip_first': False,
      'begin_fraction': 0.5, 'end_fraction': 0.75, 'every': 100})
  c.batch_size = 128            # global batch, split over all devices
  c.eval_batch_size = 1000
  c.num_epochs = 1.0            # used when num_steps == 0
  c.num_steps = 0
  c.stop_at_step = 0            # checkpoint and exit at this step (0 = run to the end)
  c.log_every = 100
  c.eval_every = 0              # 0 = only at the end
  c.checkpoint_every = 1000
  c.prefetch = 2                # training batches built ahead on a background thread (0 = inline)
  c.keep_checkpoints = 3
  c.verify_checkpoints = True   # read every checkpoint back and check its digest
  c.seed = 0                    # uint32: data order, init, and every generated weight
  c.data_seed = -1              # data order and augmentation instead (-1: config.seed);
                                # a sweep fixes it so its variants see the same batches
  # Devices per mesh axis (-1: the rest) and where arrays live; see
  # pemn_jax/train/sharding.py. Data parallel by default; FSDP:
  # mesh.fsdp=N (or -1) with sharding.state='fsdp' (and params='fsdp').
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  c.sharding = ml_collections.ConfigDict(
      {'state': 'replicate',   # preset or [(regex over train-state paths, rule)]
       'params': 'replicate',  # the same over materialized-param paths
       'generate': 'auto'},    # auto | sharded | replicated: generated arrays per device
      type_safe=False)
  return c


# Keys whose value may change when a run resumes from its checkpoints (length,
# cadence, where data is read from, evaluation, and the learning rate / gradient
# clipping -- to continue a diverged run from its last finite checkpoint; the
# mesh and sharding -- a checkpoint restores onto any mesh; prefetching);
# any other difference between the stored config and the new one is refused.
RESUMABLE_KEYS = ('num_steps', 'num_epochs', 'stop_at_step', 'log_every', 'eval_every',
                  'checkpoint_every', 'keep_checkpoints', 'verify_checkpoints', 'eval_batch_size',
                  'test_limit', 'data_dir', 'source_dir', 'optimizer.lr', 'optimizer.grad_clip',
                  'mesh', 'sharding', 'prefetch')


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key/value."""
  base = base_config()
  for key in c.keys():
    if key not in base:
      raise ConfigError(f'unknown config key {key!r}; known keys: {sorted(base.keys())}')
  for key in base.keys():
    if key not in c:
      raise ConfigError(f'config is missing key {key!r}')
  for group in ('optimizer', 'prune', 'augment_options', 'mesh', 'sharding'):
    for key in c[group].keys():
      if key not in base[group]:
        raise ConfigError(f'unknown config key {group}.{key}; known: {sorted(base[group])}')
  for key, value in _leaves(c.to_dict()):
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'config.{key}={value!r} is invalid: numbers must be finite')

  def need(ok, key, value, what):
    if not ok:
      raise ConfigError(f'config.{key}={value!r} is invalid: {what}')

  need(c.dataset in DATASETS, 'dataset', c.dataset, f'must be one of {DATASETS}')
  need(isinstance(c.model, str) and models.is_known(c.model), 'model', c.model,
       f'must be one of {sorted(models.REGISTRY)} or an import path package.module:Constructor')
  o = c.optimizer
  need(o.name in OPTIMIZERS, 'optimizer.name', o.name, f'must be one of {OPTIMIZERS}')
  need(o.schedule in SCHEDULES, 'optimizer.schedule', o.schedule, f'must be one of {SCHEDULES}')
  need(_num(o.lr) and o.lr > 0, 'optimizer.lr', o.lr, 'must be a number > 0')
  need(_num(o.weight_decay) and o.weight_decay >= 0, 'optimizer.weight_decay', o.weight_decay,
       'must be >= 0')
  need(_num(o.momentum) and 0 <= o.momentum < 1, 'optimizer.momentum', o.momentum,
       'must be in [0, 1)')
  for key in ('batch_size', 'eval_batch_size', 'log_every', 'keep_checkpoints',
              'checkpoint_every'):
    need(_int(c[key]) and c[key] > 0, key, c[key], 'must be an integer > 0')
  for key in ('num_steps', 'stop_at_step', 'eval_every', 'train_limit', 'test_limit', 'seed',
              'prefetch'):
    need(_int(c[key]) and c[key] >= 0, key, c[key], 'must be an integer >= 0')
  need(c.seed < 2**32, 'seed', c.seed, 'must be < 2**32 (a uint32)')
  need(_int(c.data_seed) and -1 <= c.data_seed < 2**32, 'data_seed', c.data_seed,
       'must be -1 (config.seed) or an integer in [0, 2**32)')
  need(not 0 < c.train_limit < c.batch_size, 'train_limit', c.train_limit,
       f'is smaller than one batch (batch_size={c.batch_size})')
  need(isinstance(c.verify_checkpoints, bool), 'verify_checkpoints', c.verify_checkpoints,
       'must be true or false')
  need(_num(o.decay_epochs) and o.decay_epochs >= 0, 'optimizer.decay_epochs', o.decay_epochs,
       'must be >= 0')
  need(o.schedule != 'exponential' or o.decay_epochs > 0, 'optimizer.decay_epochs',
       o.decay_epochs, 'must be > 0 with the exponential schedule')
  need(_int(o.warmup_steps) and o.warmup_steps >= 0, 'optimizer.warmup_steps', o.warmup_steps,
       'must be an integer >= 0')
  need(_num(o.grad_clip) and o.grad_clip >= 0, 'optimizer.grad_clip', o.grad_clip, 'must be >= 0')
  try:
    aug.parse(c.augment)
  except ValueError as e:
    raise ConfigError(f'config.augment={c.augment!r} is invalid: {e}') from None
  a = c.augment_options
  need(_int(a.ra_ops) and 0 <= a.ra_ops <= 14, 'augment_options.ra_ops', a.ra_ops, 'in [0, 14]')
  need(_int(a.ra_magnitude) and 0 <= a.ra_magnitude <= 30, 'augment_options.ra_magnitude',
       a.ra_magnitude, 'must be an integer in [0, 30]')
  for key in ('jitter', 'erase'):
    need(_num(a[key]) and 0 <= a[key] <= 1, f'augment_options.{key}', a[key], 'in [0, 1]')
  need(_num(c.num_epochs) and c.num_epochs > 0, 'num_epochs', c.num_epochs, 'must be > 0')
  need('name' in c.param, 'param', c.param.to_dict(), 'needs a "name"')
  need(c.prune.criterion in ('', *CRITERIA), 'prune.criterion', c.prune.criterion,
       f"must be '' or one of {CRITERIA}")
  need(c.prune.allocation in ALLOCATIONS, 'prune.allocation', c.prune.allocation,
       f'must be one of {ALLOCATIONS}')
  need(_int(c.prune.every) and c.prune.every > 0, 'prune.every', c.prune.every,
       'must be an integer > 0')
  need(isinstance(c.prune.skip_first, bool), 'prune.skip_first', c.prune.skip_first,
       'must be true or false')
  for key in ('begin_fraction', 'end_fraction'):
    need(_num(c.prune[key]) and 0 <= c.prune[key] <= 1, f'prune.{key}', c.prune[key],
         'must be in [0, 1]')
  need(_num(c.prune.sparsity) and 0 <= c.prune.sparsity < 1, 'prune.sparsity', c.prune.sparsity,
       'must be in [0, 1)')
  try:
    check_config(c.mesh.to_dict(), c.sharding.to_dict())
  except ShardingError as e:
    raise ConfigError(str(e)) from None
  need(not c.prune.criterion or c.param.name == 'dense', 'prune.criterion', c.prune.criterion,
       "pruning baselines train dense weights: use param.name='dense'")


def _leaves(tree, prefix=''):
  """(dotted key, value) of every leaf of a nested dict (list items included)."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f'{prefix}{k}.')
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _leaves(v, f'{prefix[:-1]}[{i}].')
  else:
    yield prefix[:-1], tree


def _plain(x):
  """JSON-comparable: tuples as lists, recursively."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def config_differences(stored: dict, current: dict) -> list[str]:
  """The keys (dotted) where a resumed run's config differs from the one its
  checkpoint was written with, ``RESUMABLE_KEYS`` aside; keys an older
  checkpoint does not have count as their defaults."""
  def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict) and v:
        out.update(flat(v, f'{prefix}{k}.'))
      else:
        out[f'{prefix}{k}'] = _plain(v)
    return out
  base = flat(base_config().to_dict())
  old, new = {**base, **flat(stored)}, {**base, **flat(current)}
  diffs = []
  for k in sorted(set(old) | set(new)):
    if k in RESUMABLE_KEYS or k.split('.')[0] in RESUMABLE_KEYS:
      continue
    if old.get(k) != new.get(k):
      diffs.append(f'{k}: checkpoint {old.get(k)!r}, this run {new.get(k)!r}')
  return diffs


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'model=resnet20,dataset=cifar10'`` -> ConfigDict over ``defaults``
  (values converted to each default's type; unknown keys rejected)."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(','):
    if '=' not in item:
      raise ConfigError(f'config argument {item!r} is not key=value (known keys: '
                        f'{sorted(defaults)})')
    key, value = item.split('=', 1)
    if key not in defaults:
      raise ConfigError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    kind = type(defaults[key])
    try:
      out[key] = (value.lower() in ('1', 'true', 'yes')) if kind is bool else kind(value)
    except ValueError:
      raise ConfigError(f'config argument {key}={value!r} is not a {kind.__name__}') from None
  return out


def dataset_defaults(c: ml_collections.ConfigDict, dataset: str) -> None:
  """CIFAR-style data gets the standard crop + flip augmentation."""
  c.dataset = dataset
  c.augment = 'cifar' if ('cifar' in dataset or 'imagenet' in dataset) else ''
