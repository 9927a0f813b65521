"""Meshes, regex sharding rules, and the layout of one training run.

The mesh has two axes, ``('data', 'fsdp')`` (``config.mesh``: devices per
axis, ``-1`` = the rest); batches are split over both. Where each array lives
is decided by rules, as in big_vision and maxtext: ``(regex, rule)`` pairs
matched (``re.fullmatch``, first match wins, no match = replicated) against
train-state paths (``config.sharding.state``: ``state/ring``,
``opt_state/0/mu/scores/Conv_0/kernel``, ``model_state/batch_stats/...``) and
materialized-param paths (``config.sharding.params``: ``Conv_0/kernel``). A
rule is ``'replicated'``, ``'fsdp'`` (split the largest dimension the ``fsdp``
axis divides) or an explicit spec per dimension; a preset name stands for
``[('.*', preset)]``. ``config.sharding.generate`` chooses per-device
generation (``pemn_jax.ops.spmd``). Details and measurements: docs/scaling.md.
"""

from __future__ import annotations

import ast
import contextlib
import math
import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from pemn_jax.ops import spmd
from pemn_jax.pytrees import path_name

AXES = ('data', 'fsdp')
PRESETS = {'replicated': (('.*', 'replicated'),), 'fsdp': (('.*', 'fsdp'),)}
GENERATE = ('auto', 'sharded', 'replicated')


class ShardingError(ValueError):
  """A mesh or sharding rule that cannot be used with these devices/arrays."""


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """``{'data': d, 'fsdp': f}`` with ``d * f == num_devices``.

  Args:
    mesh_config: ``{'data': int, 'fsdp': int}``; one of them may be -1 (the
      devices the other leaves).
    num_devices: how many devices the mesh spans.
  Returns:
    The axis sizes.
  Raises:
    ShardingError: unknown axes, sizes < 1 (but -1), or a product that is
      not the device count.
  """
  cfg = dict(mesh_config)
  unknown = set(cfg) - set(AXES)
  if unknown:
    raise ShardingError(f'config.mesh has unknown axes {sorted(unknown)}; axes: {AXES}')
  sizes = {a: cfg.get(a, 1) for a in AXES}
  for a, v in sizes.items():
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      raise ShardingError(f'config.mesh.{a}={v!r} must be an integer >= 1 or -1 (the rest)')
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ShardingError('config.mesh: only one axis may be -1')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ShardingError(f'config.mesh={cfg}: {num_devices} devices cannot be split into '
                          f'{fixed} x (the rest)')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ShardingError(f'config.mesh={cfg} spans {math.prod(sizes.values())} devices, but '
                        f'there are {num_devices} (jax.device_count())')
  return sizes


def make_mesh(mesh_config=None, devices=None) -> jax.sharding.Mesh:
  """The ``('data', 'fsdp')`` mesh over ``devices`` (default: all devices of
  all processes), with compiler-propagated (Auto) axes."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config or {'data': -1, 'fsdp': 1}, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, AXES, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def _check_rule(rule, where: str):
  if isinstance(rule, str):
    if rule not in PRESETS:
      raise ShardingError(f'{where}: rule {rule!r} must be one of {sorted(PRESETS)} or a spec '
                          'such as (None, "fsdp")')
    return rule
  if not isinstance(rule, (list, tuple)):
    raise ShardingError(f'{where}: rule {rule!r} must be a string or a list of axes per dim')
  spec = []
  for entry in rule:
    names = (entry,) if entry is None or isinstance(entry, str) else tuple(entry)
    for n in names:
      if n is not None and n not in AXES:
        raise ShardingError(f'{where}: {n!r} in {rule!r} is not a mesh axis {AXES}')
    spec.append(None if entry is None else (entry if isinstance(entry, str) else tuple(entry)))
  return tuple(spec)


def parse_rules(rules, where: str = 'rules') -> list[tuple[re.Pattern, object]]:
  """Rules as ``[(compiled regex, rule)]``.

  Args:
    rules: a preset name (``'replicated'``, ``'fsdp'``) or a list of
      ``(regex, rule)`` pairs.
    where: what to call the rules in errors (e.g. ``'config.sharding.state'``).
  Returns:
    The parsed rules, in order.
  Raises:
    ShardingError: an unknown preset, a bad regex or rule.
  """
  if isinstance(rules, str) and rules.strip().startswith(('[', '(')):
    try:  # a list written on the command line: --config.sharding.state="[('.*', 'fsdp')]"
      rules = ast.literal_eval(rules)
    except (ValueError, SyntaxError) as e:
      raise ShardingError(f'{where}={rules!r} is not a valid list of (regex, rule) pairs: '
                          f'{e}') from None
  if isinstance(rules, str):
    if rules not in PRESETS:
      raise ShardingError(f'{where}={rules!r} must be one of {sorted(PRESETS)} or a list of '
                          '(regex, rule) pairs')
    rules = PRESETS[rules]
  out = []
  for i, pair in enumerate(rules):
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
      raise ShardingError(f'{where}[{i}]={pair!r} must be a (regex, rule) pair')
    try:
      pattern = re.compile(pair[0])
    except re.error as e:
      raise ShardingError(f'{where}[{i}]: bad regex {pair[0]!r}: {e}') from None
    out.append((pattern, _check_rule(pair[1], f'{where}[{i}]')))
  return out


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def spec_for(name: str, shape, rules, mesh, where: str = 'rules') -> PS:
  """The PartitionSpec of the leaf ``name`` of ``shape`` under parsed ``rules``.

  Raises:
    ShardingError: an explicit spec longer than the array's rank or whose
      axes do not divide the dimension (the message names leaf, shape, mesh).
  """
  rule = next((r for pattern, r in rules if pattern.fullmatch(name)), None)
  if rule is None:
    return PS()
  shape = tuple(shape)
  if rule == 'replicated' or not shape:
    return PS()
  if rule == 'fsdp':
    n = mesh.shape['fsdp']
    if n == 1:
      return PS()
    for d in sorted(range(len(shape)), key=lambda d: (-shape[d], -d)):
      if shape[d] % n == 0:
        return PS(*[('fsdp' if i == d else None) for i in range(len(shape))])
    return PS()
  if len(rule) > len(shape):
    raise ShardingError(f'{where}: spec {rule} for {name} has {len(rule)} entries, but the '
                        f'array has shape {shape}')
  for d, entry in enumerate(rule):
    k = _axis_size(mesh, entry)
    if shape[d] % k:
      raise ShardingError(
          f'{where}: {name} of shape {shape} cannot be split as {rule} on the mesh '
          f'{dict(mesh.shape)}: dimension {d} ({shape[d]}) is not divisible by {k}')
  return PS(*rule)


def tree_shardings(tree, rules, mesh, where: str = 'rules'):
  """A pytree of NamedShardings for ``tree`` (arrays or ShapeDtypeStructs)."""
  rules = parse_rules(rules, where) if isinstance(rules, str) or (
      rules and not isinstance(rules[0][0], re.Pattern)) else rules
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, spec_for(path_name(kp), np.shape(x), rules, mesh, where)),
      tree)


def bytes_per_device(tree, shardings) -> int:
  """Bytes the largest shard of every leaf takes on one device, summed."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def device_memory_limit() -> int | None:
  """Bytes one local device can hold (None where the backend does not say,
  as on CPU: see ``host_memory_available``)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    return None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def host_memory_available() -> int | None:
  """Bytes this process can still allocate on the host (what its CPU
  devices share): the kernel's ``MemAvailable``, or less under an
  address-space limit (``ulimit -v``: the limit less what the process has
  mapped); None where neither is known (not Linux)."""
  import resource
  known = []
  info = _proc_kib('/proc/meminfo', 'MemAvailable:')
  if info is not None:
    known.append(info)
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  mapped = _proc_kib('/proc/self/status', 'VmSize:')
  if soft != resource.RLIM_INFINITY and mapped is not None:
    known.append(max(0, soft - mapped))
  return min(known) if known else None


def _proc_kib(path: str, key: str) -> int | None:
  """A ``key: N kB`` line of a /proc file, in bytes."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(key):
          return int(line.split()[1]) << 10
  except (OSError, ValueError, IndexError):
    return None
  return None


class Layout:
  """Where a run's arrays live: the mesh, the batch, the train state (per
  ``config.sharding.state``) and the materialized params (per
  ``config.sharding.params``, and ``generate``).

  Args:
    mesh: the ``('data', 'fsdp')`` mesh.
    state_rules: rules (or preset) over train-state paths.
    param_rules: rules (or preset) over materialized-param paths.
    generate: ``'auto'``, ``'sharded'`` or ``'replicated'``.
  """

  def __init__(self, mesh, state_rules='replicated', param_rules='replicated',
               generate: str = 'auto'):
    if generate not in GENERATE:
      raise ShardingError(f'config.sharding.generate={generate!r} must be one of {GENERATE}')
    self.mesh = mesh
    self.state_rules = parse_rules(state_rules, 'config.sharding.state')
    self.param_rules = parse_rules(param_rules, 'config.sharding.params')
    self.generate = generate
    self.batch = NamedSharding(mesh, PS(AXES))
    self.replicated = NamedSharding(mesh, PS())
    self._set_generation(generate == 'sharded' or (generate == 'auto' and mesh.size > 1))

  def _set_generation(self, sharded: bool):
    self.sharded_generation = bool(sharded)
    self.flat = NamedSharding(self.mesh, PS(AXES)) if self.sharded_generation else None

  def resolve(self, param) -> Layout:
    """Settles ``generate='auto'`` for a parameterization: sharded on more
    than one device when its trained state is under half of the params.

    Args:
      param: the run's ``Parameterization``.
    Returns:
      self.
    """
    if self.generate == 'auto':
      small = 2 * param.num_trainable() < param.num_params
      self._set_generation(self.mesh.size > 1 and small)
    return self

  @classmethod
  def from_config(cls, config, devices=None) -> Layout:
    return cls(make_mesh(config.mesh.to_dict(), devices), config.sharding.state,
               config.sharding.params, config.sharding.generate)

  def state_shardings(self, abstract_state):
    """NamedShardings of a train state (or its abstract shapes)."""
    return tree_shardings(abstract_state, self.state_rules, self.mesh, 'config.sharding.state')

  def param_shardings(self, params):
    return tree_shardings(params, self.param_rules, self.mesh, 'config.sharding.params')

  def generating(self):
    """Context for tracing ``param.materialize`` (sharded generation)."""
    return spmd.generation(self.flat) if self.flat is not None else contextlib.nullcontext()

  def materialize(self, param, state, seed, rng=None):
    """``param.materialize`` with sharded generation and the params layout
    as sharding constraints (inside jit)."""
    with self.generating():
      params = param.materialize(state, seed, rng)
    shardings = self.param_shardings(params)
    return jax.tree.map(jax.lax.with_sharding_constraint, params, shardings)

  def describe(self) -> str:
    return (f'mesh {dict(self.mesh.shape)}, generation '
            f'{"sharded" if self.sharded_generation else "replicated"}')


def check_config(mesh_config, sharding_config) -> None:
  """Validates ``config.mesh`` and ``config.sharding`` before any device is
  used (the device count itself is checked when the mesh is built)."""
  cfg = dict(mesh_config)
  fixed = math.prod(v for v in cfg.values()
                    if isinstance(v, int) and not isinstance(v, bool) and v > 0)
  mesh_shape(cfg, fixed)
  parse_rules(sharding_config['state'], 'config.sharding.state')
  parse_rules(sharding_config['params'], 'config.sharding.params')
  if sharding_config['generate'] not in GENERATE:
    raise ShardingError(f'config.sharding.generate={sharding_config["generate"]!r} must be one '
                        f'of {GENERATE}')
