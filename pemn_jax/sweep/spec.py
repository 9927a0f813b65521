"""What a sweep is: a config, the swept keys, the variants, and their groups.

A sweep is ``--config FILE[:ARG]`` and one or more ``key=v1,v2,...``. The
variants are the product of the swept values. A key is either a config key
(dotted: ``seed``, ``optimizer.lr``, ``param.keep``, ``param.source.ratio``)
or, prefixed ``arg.``, an argument of the config file's ``get_config``
(``arg.mode=ol,mp,rp`` calls ``get_config('mode=ol,...')`` for each value).

Variants whose configs differ only in *traced* keys train as one compiled,
vmapped step (a group): ``seed`` (init, generated weights, permutations,
signs, prototypes, per-step randomness), ``optimizer.lr``,
``optimizer.weight_decay`` (held in the optimizer state), and the options a
parameterization lists in its ``traced`` attribute (``keep`` of masks,
``sparsity`` of gates). Every variant of a sweep reads the same training
batches: its config's ``data_seed`` is set to the base config's data seed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re

import ml_collections

from pemn_jax import params as param_lib
from pemn_jax.config import ConfigError, base_config, convert, validate

OPTIMIZER_TRACED = ('optimizer.lr', 'optimizer.weight_decay')


def load_config(spec: str, arg_overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config of ``FILE[:ARG]`` (a ``configs/*.py`` with ``get_config``).

  Args:
    spec: ``path/to/config.py`` or ``path/to/config.py:key=value,...``.
    arg_overrides: ``get_config`` arguments set on top of ``ARG``.
  Returns:
    The ConfigDict.
  Raises:
    ConfigError: no such file, no ``get_config``, or a bad argument.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    from pemn_jax.cli import missing_config_file
    raise ConfigError(missing_config_file(spec))
  items = dict(kv.split('=', 1) for kv in arg.split(',') if kv and '=' in kv)
  bad = [kv for kv in arg.split(',') if kv and '=' not in kv]
  if bad:
    raise ConfigError(f'--config {spec!r}: argument {bad[0]!r} is not key=value')
  items.update({k: str(v) for k, v in (arg_overrides or {}).items()})
  name = 'pemn_jax_sweep_config_' + re.sub(r'\W', '_', os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - a user's file: any error is a bad config
    raise ConfigError(f'--config {path!r} failed to load: {type(e).__name__}: {e}') from e
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'--config {path!r} has no get_config(arg)')
  joined = ','.join(f'{k}={v}' for k, v in items.items()) or None
  try:
    return module.get_config(joined)
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(f'--config {path}:{joined}: {e}') from e


def parse_sweeps(items) -> list[tuple[str, list[str]]]:
  """``['seed=0,1,2', 'optimizer.lr=0.1,0.01']`` -> ``[(key, [raw values])]``.

  Raises:
    ConfigError: not ``key=v1,...``, an empty value, or a key given twice.
  """
  out, seen = [], set()
  for item in items:
    key, eq, values = item.partition('=')
    key = key.strip()
    if not eq or not key:
      raise ConfigError(f'--sweep {item!r} is not key=v1,v2,...')
    vals = [v.strip() for v in values.split(',')]
    if not vals or any(not v for v in vals):
      raise ConfigError(f'--sweep {item!r} has an empty value')
    if key in seen:
      raise ConfigError(f'--sweep key {key!r} is given twice')
    if len(set(vals)) != len(vals):
      raise ConfigError(f'--sweep {item!r} repeats a value')
    seen.add(key)
    out.append((key, vals))
  return out


def _number(raw: str) -> bool:
  try:
    float(raw)
    return True
  except ValueError:
    return False


def _literal(raw: str):
  """A new key's value: int, float, bool or string, as it reads; a tuple when
  it has ``x`` between numbers (``300x100``; one item: ``4x``)."""
  parts = raw.split('x')
  if len(parts) > 1 and all(_number(p) for p in parts if p) and any(parts):
    return tuple(_literal(p) for p in parts if p)
  for kind in (int, float):
    try:
      return kind(raw)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(raw.lower(), raw)


def _convert(key: str, raw: str, current):
  """``raw`` as the type of ``current`` (the config's value at ``key``; a
  None value is typed by its ``base_config`` field); tuples and lists are
  written with ``x`` between items (``300x100``)."""
  if current is _MISSING:
    return _literal(raw)
  if isinstance(current, (tuple, list)):
    items = [_convert(key, r, current[0] if current else _MISSING) for r in raw.split('x')]
    return type(current)(items)
  if current is None:
    if key not in base_config():
      return _literal(raw)
    current_kind = base_config().get_type(key)
  else:
    current_kind = type(current)
  try:
    return convert(raw, current_kind, key)
  except ConfigError as e:
    raise ConfigError(f'{e} (the config has {key}={current!r})') from None


def _get(tree: dict, dotted: str):
  node = tree
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _new_ok(tree: dict, dotted: str) -> bool:
  """A key that may be added: a model constructor argument (the model checks
  it: an unknown one is a config error naming it)."""
  parts = dotted.split('.')
  return len(parts) == 2 and parts[0] == 'model_kwargs' and isinstance(tree.get(parts[0]), dict)


def _set(tree: dict, dotted: str, value):
  parts = dotted.split('.')
  node = tree
  for part in parts[:-1]:
    node = node[part]
  node[parts[-1]] = value


@dataclasses.dataclass
class Variant:
  """One configuration of a sweep."""
  name: str          # e.g. 'seed=1,optimizer.lr=0.01' (its directory under the workdir)
  values: dict       # swept key -> value (as given, typed)
  config: ml_collections.ConfigDict


def variant_name(values: dict) -> str:
  name = ','.join(f'{k}={v}' for k, v in values.items()) or 'base'
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', name)


def expand(config_spec: str, sweeps, overrides=()) -> list[Variant]:
  """The variants of a sweep (the product of the swept values), validated.

  Args:
    config_spec: ``FILE[:ARG]``.
    sweeps: ``parse_sweeps``' output.
    overrides: ``['key=value', ...]``: dotted config keys set in every
      variant (before the swept values).
  Returns:
    Variants in product order (the last key varies fastest).
  Raises:
    ConfigError: an unknown key, a bad value, or an invalid variant config.
  """
  sets = []
  for item in overrides:
    key, eq, value = item.partition('=')
    if not eq or not key.strip():
      raise ConfigError(f'--set {item!r} is not key=value')
    sets.append((key.strip(), value.strip()))
  if set(k for k, _ in sets) & set(k for k, _ in sweeps):
    raise ConfigError('a key is both --set and --sweep')

  def apply_sets(d):
    for key, value in sets:
      current = _get(d, key)
      if current is _MISSING and not _new_ok(d, key):
        raise ConfigError(f'--set {key}: the config has no key {key!r}')
      _set(d, key, _convert(key, value, current))
    return d

  base = ml_collections.ConfigDict(apply_sets(load_config(config_spec).to_dict()))
  validate(base)
  data_seed = base.seed if base.data_seed is None else base.data_seed
  keys = [k for k, _ in sweeps]
  if not sweeps:
    raise ConfigError('give at least one --sweep key=v1,v2,...')
  base_dict = base.to_dict()
  for key, _ in sweeps:
    if key.startswith('arg.'):
      continue
    if _get(base_dict, key) is _MISSING and not _new_ok(base_dict, key):
      raise ConfigError(f'--sweep {key}: the config has no key {key!r} (config keys are dotted, '
                        'e.g. optimizer.lr, param.keep; get_config arguments are arg.NAME)')
  variants = []
  for combo in itertools.product(*[vals for _, vals in sweeps]):
    raw = dict(zip(keys, combo, strict=True))
    args = {k[4:]: v for k, v in raw.items() if k.startswith('arg.')}
    c = load_config(config_spec, args) if args else load_config(config_spec)
    d = apply_sets(c.to_dict())
    values = {}
    for key, value in raw.items():
      if key.startswith('arg.'):
        values[key] = value
        continue
      current = _get(d, key)
      if current is _MISSING and not _new_ok(d, key):
        raise ConfigError(f'--sweep {key}: the config made with {args} has no key {key!r}')
      typed = _convert(key, value, current)
      _set(d, key, typed)
      values[key] = typed
    d['data_seed'] = data_seed
    c = ml_collections.ConfigDict(d)
    try:
      validate(c)
    except ConfigError as e:
      raise ConfigError(f'variant {variant_name(values)}: {e}') from None
    variants.append(Variant(variant_name(raw), values, c))  # named as written
  names = [v.name for v in variants]
  if len(set(names)) != len(names):
    raise ConfigError('two variants get the same name: ' + ', '.join(names))
  return variants


def param_traced_keys(spec: dict, prefix: str = 'param') -> list[str]:
  """Dotted config keys of a param spec that its classes can trace."""
  cls = param_lib.REGISTRY.get(spec.get('name'))
  if cls is None:
    return []
  out = [f'{prefix}.{k}' for k in cls.traced if k in spec]
  if cls.takes_source and isinstance(spec.get('source'), dict):
    out += param_traced_keys(spec['source'], f'{prefix}.source')
  return out


def traced_keys(config) -> list[str]:
  """The config keys whose values a vmapped group may differ in."""
  d = config.to_dict()
  keys = list(OPTIMIZER_TRACED) + param_traced_keys(d['param'])
  if d['prune']['criterion'] != 'random':  # random pruning masks use the seed in Python
    keys.append('seed')
  return keys


def signature(config) -> str:
  """The config with its traced keys blanked, as JSON: equal signatures
  train in one vmapped step."""
  d = config.to_dict()
  for key in traced_keys(config):
    _set(d, key, None)
  # Cadence and bookkeeping keys do not change the compiled step, but a group
  # shares one loop: they must agree too (they are part of the signature).
  return json.dumps(d, sort_keys=True, default=str)


def group(variants: list[Variant]) -> list[list[Variant]]:
  """Variants split into vmappable groups, in first-appearance order."""
  groups: dict[str, list[Variant]] = {}
  for v in variants:
    groups.setdefault(signature(v.config), []).append(v)
  return list(groups.values())
