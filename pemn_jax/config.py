"""The config schema: defaults, and validation with errors that name the key."""

from __future__ import annotations

import math
import operator
import re

import ml_collections

from pemn_jax import models
from pemn_jax.cli import close_match
from pemn_jax.data import augment as aug
from pemn_jax.data.sources import DATASETS, image_shape, is_known, is_variable
from pemn_jax.pytrees import plain
from pemn_jax.train.optim import OPTIMIZERS, SCHEDULES
from pemn_jax.train.pruning import ALLOCATIONS, CRITERIA
from pemn_jax.train.sharding import ShardingError, check_config


class ConfigError(ValueError):
  """A config key or value that cannot be used."""


def _unset(kind):
  """A config value that is None (use the default) until set to a ``kind``."""
  return ml_collections.config_dict.placeholder(kind)


DTYPES = ('float32', 'bfloat16')
# Values older pemn_jax configs used for "the default" (stored in checkpoints
# and sweep results): read as None.
LEGACY_DEFAULTS = {'data_dir': '', 'source_dir': '', 'train_limit': 0, 'test_limit': 0,
                   'num_steps': 0, 'stop_at_step': 0, 'data_seed': -1}


def base_config() -> ml_collections.ConfigDict:
  """Every key a training config has (configs/*.py start from this)."""
  c = ml_collections.ConfigDict()
  c.dataset = 'fashion_mnist'   # see pemn_jax.data.sources.DATASETS
  # None: the default (a key typed so that --config.KEY=VALUE can set it).
  c.data_dir = _unset(str)      # TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.source_dir = _unset(str)    # local files to prepare from (None: the dataset's usual place)
  c.train_limit = _unset(int)   # use only the first N training examples (None: all)
  c.test_limit = _unset(int)    # evaluate on the first N test examples (None: all)
  # Variable-size datasets (folder:PATH, tfds:imagenet2012, tfds:imagenette):
  c.image_size = _unset(int)    # decoded side: random-resized crop / resize + centre crop (224)
  c.data_workers = _unset(int)  # decoding processes (None: the host's cores; 0: in-process)
  c.augment = ''                # ops: crop,flip,randaugment,jitter,erase; presets cifar, pemn
  c.augment_options = ml_collections.ConfigDict(
      {'ra_ops': 2, 'ra_magnitude': 12, 'jitter': 0.2, 'erase': 0.2})
  c.imports = ''                # your modules that register models / methods, imported first:
                                # dotted names or .py files, comma-separated (import_modules)
  c.model = 'mlp'
  c.model_kwargs = ml_collections.ConfigDict()
  c.dtype = 'float32'           # compute dtype: float32 | bfloat16 (mixed precision: the state,
                                # optimizer, batch statistics and loss stay float32)
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
  c.label_smoothing = 0.0       # training targets: (1 - s) one-hot + s uniform
  c.batch_size = 128            # global batch, split over all devices
  c.eval_batch_size = 1000
  c.num_epochs = 1.0            # used when num_steps == 0
  c.num_steps = _unset(int)     # None: num_epochs of the training split
  c.stop_at_step = _unset(int)  # checkpoint and exit at this step (None: run to the end)
  c.log_every = 100
  c.eval_every = 0              # 0 = only at the end
  c.checkpoint_every = 1000
  c.prefetch = 2                # training batches built ahead on a background thread (0 = inline)
  c.keep_checkpoints = 3
  c.verify_checkpoints = True   # read every checkpoint back and check its digest
  c.seed = 0                    # uint32: data order, init, and every generated weight
  c.data_seed = _unset(int)     # data order and augmentation instead (None: config.seed);
                                # a sweep fixes it so its variants see the same batches
  # Devices per mesh axis (-1: the rest) and where arrays live; see
  # pemn_jax/train/sharding.py. Data parallel by default; FSDP:
  # mesh.fsdp=N (or -1) with sharding.state='fsdp' (and params='fsdp').
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  c.sharding = ml_collections.ConfigDict(
      {'state': 'replicated',   # preset or [(regex over train-state paths, rule)]
       'params': 'replicated',  # the same over materialized-param paths
       'generate': 'auto'},    # auto | sharded | replicated: generated arrays per device
      type_safe=False)
  return c


# Keys whose value may change when a run resumes from its checkpoints (length,
# cadence, where data is read from, evaluation, and the learning rate / gradient
# clipping -- to continue a diverged run from its last finite checkpoint; the
# mesh and sharding -- a checkpoint restores onto any mesh; prefetching; the compute
# dtype -- the state is float32 either way);
# any other difference between the stored config and the new one is refused.
RESUMABLE_KEYS = ('num_steps', 'num_epochs', 'stop_at_step', 'log_every', 'eval_every',
                  'checkpoint_every', 'keep_checkpoints', 'verify_checkpoints', 'eval_batch_size',
                  'test_limit', 'data_dir', 'source_dir', 'optimizer.lr', 'optimizer.grad_clip',
                  'mesh', 'sharding', 'prefetch', 'dtype', 'data_workers', 'imports')


# Numeric keys: (type, lower bound, upper bound, None allowed); a bound is
# (operator, value), '>=' / '>' and '<=' / '<', or None (unbounded).
NUMBERS = {
    **dict.fromkeys(('batch_size', 'eval_batch_size', 'log_every', 'keep_checkpoints',
                     'checkpoint_every', 'prune.every'), (int, ('>=', 1), None, False)),
    **dict.fromkeys(('eval_every', 'prefetch', 'optimizer.warmup_steps'),
                    (int, ('>=', 0), None, False)),
    'image_size': (int, ('>=', 8), None, True), 'data_workers': (int, ('>=', 0), None, True),
    **dict.fromkeys(('num_steps', 'stop_at_step', 'train_limit', 'test_limit'),
                    (int, ('>=', 1), None, True)),
    'seed': (int, ('>=', 0), ('<', 2**32), False),
    'data_seed': (int, ('>=', 0), ('<', 2**32), True),
    'num_epochs': (float, ('>', 0), None, False), 'optimizer.lr': (float, ('>', 0), None, False),
    **dict.fromkeys(('optimizer.weight_decay', 'optimizer.grad_clip', 'optimizer.decay_epochs'),
                    (float, ('>=', 0), None, False)),
    'optimizer.momentum': (float, ('>=', 0), ('<', 1), False),
    'label_smoothing': (float, ('>=', 0), ('<', 1), False),
    'prune.sparsity': (float, ('>=', 0), ('<', 1), False),
    **dict.fromkeys(('prune.begin_fraction', 'prune.end_fraction', 'augment_options.jitter',
                     'augment_options.erase'), (float, ('>=', 0), ('<=', 1), False)),
    'augment_options.ra_ops': (int, ('>=', 0), ('<=', 14), False),
    'augment_options.ra_magnitude': (int, ('>=', 0), ('<=', 30), False),
}


_OPS = {'>=': operator.ge, '>': operator.gt, '<=': operator.le, '<': operator.lt}


def import_modules(spec) -> list[str]:
  """Imports user code that registers models or methods (``models.register``,
  ``params.register``) before a config, run or model file is built.

  Args:
    spec: comma-separated (or a list of) dotted module names
      (``mypackage.methods``) or paths of ``.py`` files; ``''``/None: none.
  Returns:
    The modules imported (each at most once per process).
  Raises:
    ConfigError: a module that cannot be imported (naming it and why).
  """
  import importlib
  import importlib.util
  import os
  import sys
  names = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec or ())
           if s and s.strip()]
  for name in names:
    try:
      if name.endswith('.py'):
        key = 'pemn_jax_user_' + os.path.abspath(name).replace(os.sep, '_').replace('.', '_')
        if key in sys.modules:
          continue
        if not os.path.isfile(name):
          raise FileNotFoundError(f'no such file {name!r}')
        module_spec = importlib.util.spec_from_file_location(key, name)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[key] = module
        try:
          module_spec.loader.exec_module(module)
        except BaseException:
          del sys.modules[key]
          raise
      else:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure of user code is named, not a traceback
      raise ConfigError(f'cannot import {name!r} (config.imports / --import): '
                        f'{type(e).__name__}: {e}') from None
  return names


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key/value. Imports
  ``c.imports`` first (models and methods they register are then known)."""
  if not isinstance(c.get('imports', ''), str):
    raise ConfigError(f'config.imports={c.imports!r} is invalid: must be a comma-separated string')
  import_modules(c.get('imports', ''))
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
      legacy = LEGACY_DEFAULTS.get(key, ...)
      if value == legacy and type(value) is type(legacy):
        what += f' ({legacy!r} meant the default in older configs; now leave it unset)'
      raise ConfigError(f'config.{key}={value!r} is invalid: {what}')

  def one_of(ok, key, value, choices, what):
    need(ok, key, value, what + close_match(value, choices, repr))

  one_of(is_known(c.dataset), 'dataset', c.dataset, DATASETS, f'must be one of {DATASETS}')
  need(c.image_size is None or is_variable(c.dataset), 'image_size', c.image_size,
       'applies to variable-size datasets (folder:PATH, tfds:imagenet2012, tfds:imagenette)')
  need(c.dtype in DTYPES, 'dtype', c.dtype, f'must be one of {DTYPES}')
  one_of(isinstance(c.model, str) and models.is_known(c.model), 'model', c.model,
         sorted(models.REGISTRY), f'must be one of {sorted(models.REGISTRY)} or an import '
         'path package.module:Constructor')
  o = c.optimizer
  for key, allowed in (('optimizer.name', OPTIMIZERS), ('optimizer.schedule', SCHEDULES),
                       ('prune.allocation', ALLOCATIONS), ('prune.criterion', ('', *CRITERIA))):
    value = c[key.split('.')[0]][key.split('.')[1]]
    one_of(value in allowed, key, value, allowed, f'must be one of {allowed}')
  for key, (kind, low, high, optional) in NUMBERS.items():
    group, _, name = key.rpartition('.')
    value = (c[group] if group else c)[name]
    bounds = [b for b in (low, high) if b]
    ok = (value is None and optional) or ((_int(value) if kind is int else _num(value))
                                          and all(_OPS[op](value, b) for op, b in bounds))
    need(ok, key, value, f'must be {"an integer" if kind is int else "a number"} '
         + ' and '.join(f'{op} {b}' for op, b in bounds)
         + (', or None (the default)' if optional else ''))
  for key in ('data_dir', 'source_dir'):
    need(c[key] is None or (isinstance(c[key], str) and c[key]), key, c[key],
         'must be a path, or None (the default)')
  need(c.train_limit is None or c.train_limit >= c.batch_size, 'train_limit', c.train_limit,
       f'is smaller than one batch (batch_size={c.batch_size})')
  for key, value in (('verify_checkpoints', c.verify_checkpoints),
                     ('prune.skip_first', c.prune.skip_first)):
    need(isinstance(value, bool), key, value, 'must be true or false')
  need(o.schedule != 'exponential' or o.decay_epochs > 0, 'optimizer.decay_epochs',
       o.decay_epochs, 'must be > 0 with the exponential schedule')
  try:
    aug.parse(c.augment)
  except ValueError as e:
    raise ConfigError(f'config.augment={c.augment!r} is invalid: {e}') from None
  need('name' in c.param, 'param', c.param.to_dict(), 'needs a "name"')
  try:
    check_config(c.mesh.to_dict(), c.sharding.to_dict())
  except ShardingError as e:
    raise ConfigError(str(e)) from None
  need(not c.prune.criterion or c.param.name == 'dense', 'prune.criterion', c.prune.criterion,
       "pruning baselines train dense weights: use param.name='dense'")


def without_legacy(config: dict) -> dict:
  """A stored config (a plain dict) with the values older pemn_jax wrote
  for "the default" (``LEGACY_DEFAULTS``) read as None."""
  return {**config, **{k: None for k, v in LEGACY_DEFAULTS.items()
                       if k in config and config[k] == v and type(config[k]) is type(v)}}


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
        out[f'{prefix}{k}'] = plain(v)
    return out
  base = flat(base_config().to_dict())
  old, new = {**base, **flat(without_legacy(stored))}, {**base, **flat(current)}
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


BOOLEANS = {'true': True, 'yes': True, '1': True, 'false': False, 'no': False, '0': False}


def parse_bool(value: str) -> bool:
  """``true/yes/1`` or ``false/no/0`` (any case); ValueError otherwise. The one
  way config arguments, sweeps and ``--set`` read booleans."""
  try:
    return BOOLEANS[value.strip().lower()]
  except KeyError:
    raise ValueError(f'{value!r} is not a boolean (true/false, yes/no, 1/0)') from None


def convert(raw: str, kind: type, what: str):
  """``raw`` (command-line text) as a ``kind``: a bool by ``parse_bool``, an
  int (``1e3`` too, not ``0.5``), a finite float or a string. The one
  conversion behind config arguments, ``--sweep`` and ``--set`` values.

  Raises:
    ConfigError: naming ``what`` and the value.
  """
  try:
    if kind is bool:
      return parse_bool(raw)
    if kind in (int, float):
      value = float(raw)
      if not math.isfinite(value) or (kind is int and not value.is_integer()):
        raise ValueError(raw)
      return kind(value)
    if kind is str:
      return raw
  except ValueError:
    raise ConfigError(f'{what}={raw!r}: not a {kind.__name__}') from None
  raise ConfigError(f'{what}: a {kind.__name__} value cannot be given as text')


class Unset:
  """A ``get_config`` argument without a default value: None unless given,
  then converted to ``kind``."""

  def __init__(self, kind: type):
    self.kind = kind


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'model=resnet20,dataset=cifar10'`` -> ConfigDict over ``defaults``.

  Args:
    arg: ``key=value`` pairs, comma-separated (or None).
    **defaults: each argument's default value, whose type converts a given
      value (booleans by ``parse_bool``); ``Unset(kind)`` for an argument
      that is None unless given.
  Returns:
    The arguments.
  Raises:
    ConfigError: an unknown key or a value of the wrong type.
  """
  kinds = {k: v.kind if isinstance(v, Unset) else type(v) for k, v in defaults.items()}
  out = {k: None if isinstance(v, Unset) else v for k, v in defaults.items()}
  for item in (arg.split(',') if arg else []):
    if '=' not in item:
      raise ConfigError(f'config argument {item!r} is not key=value (known keys: '
                        f'{sorted(defaults)})')
    key, value = item.split('=', 1)
    if key not in defaults:
      raise ConfigError(f'unknown config argument {key!r}' + close_match(key, defaults) +
                        f'; known: {sorted(defaults)}')
    out[key] = convert(value, kinds[key], f'config argument {key}')
  return ml_collections.ConfigDict(out)


def uses_batch_norm(c: ml_collections.ConfigDict) -> bool:
  """Whether the config's model (with its kwargs, on its dataset's images)
  normalizes with batch norm: derived from the model (``models.uses_batch_norm``).

  Raises:
    ConfigError: the model cannot be built.
  """
  try:
    return models.uses_batch_norm(c.model, image_shape(c.dataset, c.image_size),
                                  **c.model_kwargs.to_dict())
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model={c.model!r}: {e}') from None


def selected_share(c: ml_collections.ConfigDict, selection: str) -> float:
  """The fraction of the config's model's kernel weights a leaf selection
  (``'@stages'``, ``'@kernels'``, a regex) picks, from abstract shapes only.

  Raises:
    ConfigError: the model cannot be built.
  """
  from pemn_jax.kernels import conv
  from pemn_jax.params.base import KERNELS, select_paths
  from pemn_jax.pytrees import flatten
  try:
    model = models.get(c.model, **c.model_kwargs.to_dict())
    with conv.forced('xla'):  # (config files run before any backend starts)
      target = models.abstract_params(model, image_shape(c.dataset, c.image_size))
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model={c.model!r}: {e}') from None
  from flax import traverse_util
  order = list(traverse_util.flatten_dict(target, sep='/'))  # creation order
  flat = flatten(target)
  kernels = {p: math.prod(v.shape) for p, v in flat.items() if re.search(KERNELS, p)}
  chosen = select_paths(sorted(flat), selection, order)
  return sum(kernels.get(p, 0) for p in chosen) / max(1, sum(kernels.values()))


def dataset_defaults(c: ml_collections.ConfigDict, dataset: str) -> None:
  """CIFAR-style data gets the standard crop + flip augmentation (decoded
  variable-size datasets have their own random-resized crop + flip)."""
  c.dataset = dataset
  c.augment = 'cifar' if 'cifar' in dataset else ''
