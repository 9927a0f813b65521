"""The parameterization protocol (``Parameterization``: init, materialize,
regularizer, metrics, project, export; see its methods) and what every method
shares: leaf selection, initialization rules, ``Split`` (generated leaves +
the rest) and ``Composed`` (a method over another one's params).

Leaves are addressed by their '/'-joined path (``'Conv_0/kernel'``) and chosen
with a *selection* (``select_paths``): a regular expression, a named
selection (``'@kernels'``, ``'@stages'``: resolved against the model's
*creation order* of leaves), or a list of paths.
"""

from __future__ import annotations

import abc
import copy
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from pemn_jax.ops.hashing import as_seed, path_id
from pemn_jax.params import sections
from pemn_jax.pytrees import flatten, unflatten

PyTree = Any
KERNELS = r'(^|/)kernel$'
# '@kernels': every Dense/Conv kernel. '@stages': every kernel but the first and
# the last in creation order -- a network's stem and classifier, which RPG's
# reference code keeps as ordinary trained parameters.
NAMED_SELECTIONS = ('@kernels', '@stages')
FANS = ('in', 'out')
EMBEDDINGS = ('pos_embedding', 'cls', 'embedding')
RESTS = ('train', 'fixed')


def size(shape) -> int:
  return int(math.prod(shape))


def fan_in(shape) -> int:
  """Fan-in of a Dense (in, out) or Conv (kh, kw, in/groups, out) kernel."""
  return max(1, size(shape[:-1])) if len(shape) >= 2 else max(1, size(shape))


def fan_out(shape) -> int:
  """Fan-out of a Dense (in, out) or Conv (kh, kw, in/groups, out) kernel:
  ``out`` times the receptive field (PyTorch's ``_calculate_fan_in_and_fan_out``)."""
  return max(1, size(shape[:-2]) * shape[-1]) if len(shape) >= 2 else max(1, size(shape))


def init_std(path: str, shape, gain: float = 2.0, fan: str = 'in') -> float:
  """The standard deviation a freshly initialized weight leaf has here.

  Kernels: ``sqrt(gain / fan)`` (gain 2 = Kaiming/He normal; gain 1 = LeCun;
  ``fan`` 'in' or 'out'). Embeddings: 0.02. Everything else (scales, biases)
  is not random.
  """
  name = path.rsplit('/', 1)[-1]
  if name in EMBEDDINGS:
    return 0.02
  if fan not in FANS:
    raise ValueError(f'fan must be one of {FANS}, got {fan!r}')
  return math.sqrt(gain / (fan_in(shape) if fan == 'in' else fan_out(shape)))


def _is_random(path: str, shape) -> bool:
  name = path.rsplit('/', 1)[-1]
  return name in EMBEDDINGS or (len(shape) >= 2 and name not in ('scale', 'bias'))


def init_leaves(leaves: Mapping[str, Any], key, gain: float = 2.0) -> dict[str, jax.Array]:
  """The library's initial values for params leaves, chosen by name.

  ``scale`` -> ones, ``bias`` -> zeros, kernels (ndim >= 2) and embeddings ->
  normal with ``init_std``; any other 1-D leaf -> zeros. All random values are
  drawn as one vector (one RNG op compiles much faster than one per leaf).
  """
  rand = [p for p, v in leaves.items() if _is_random(p, v.shape)]
  noise = jax.random.normal(key, (sum(size(leaves[p].shape) for p in rand),), jnp.float32)
  out, start = {}, 0
  for p, v in leaves.items():
    if p in rand:
      n = size(v.shape)
      out[p] = (init_std(p, v.shape, gain) * noise[start:start + n]).reshape(v.shape)
      out[p] = out[p].astype(v.dtype)
      start += n
    else:
      out[p] = (jnp.ones if p.rsplit('/', 1)[-1] == 'scale' else jnp.zeros)(v.shape, v.dtype)
  return out


def leaf_key(seed, path: str):
  """A jax.random key that is a pure function of (seed, leaf path)."""
  return jax.random.fold_in(jax.random.key(as_seed(seed)), path_id(path))


def _check_target(target) -> tuple[dict[str, jax.ShapeDtypeStruct], list[str]]:
  """(leaves in sorted path order, paths in the target's own (creation) order)."""
  if isinstance(target, Mapping) and set(target) == {'params'}:
    target = target['params']
  if not isinstance(target, Mapping) or not target:
    raise TypeError('a parameterization target must be a non-empty params dict '
                    f'(jax.eval_shape(model.init, ...)["params"]), got {type(target)}')
  order = list(traverse_util.flatten_dict(target, sep='/'))
  flat = flatten(target)
  for p, leaf in flat.items():
    if not hasattr(leaf, 'shape') or not hasattr(leaf, 'dtype'):
      raise TypeError(f'target leaf {p!r} has no shape/dtype: {leaf!r}')
  return {p: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for p, v in flat.items()}, order


def select_paths(paths, pattern: str | None, order=None) -> list[str]:
  """The paths (in the sorted order of ``paths``) a selection picks.

  Args:
    paths: leaf paths (sorted).
    pattern: a regular expression (``re.search``), a name from
      ``NAMED_SELECTIONS``, a list of leaf paths (what model files store), or
      None (nothing).
    order: the same paths in creation order (named selections need it;
      default: ``paths``' own order).
  Returns:
    The selected paths, in ``paths``' order.
  """
  if pattern is None:
    return []
  if isinstance(pattern, (list, tuple)):
    unknown = sorted(set(pattern) - set(paths))
    if unknown:
      raise ValueError(f'selection names leaves the model does not have: {unknown[:5]}')
    chosen = set(pattern)
    return [p for p in paths if p in chosen]
  if not isinstance(pattern, str):
    raise ValueError(f'a leaf selection is a regex, a named selection or a list of paths, got '
                     f'{pattern!r}')
  if pattern.startswith('@'):
    if pattern not in NAMED_SELECTIONS:
      raise ValueError(f'unknown named selection {pattern!r}; known: {NAMED_SELECTIONS}')
    kernels = [p for p in (order or paths) if re.search(KERNELS, p)]
    if pattern == '@stages':
      kernels = kernels[1:-1]
    chosen = set(kernels)
    return [p for p in paths if p in chosen]
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'bad leaf selection regex {pattern!r}: {e}') from None
  return [p for p in paths if rx.search(p)]


class Parameterization(abc.ABC):
  """Maps (trainable state, seed) to a model's full params pytree."""

  spec: dict | None = None  # the spec ``params.build`` made it from
  # Composition: a class built over another parameterization (its ``source``
  # spec, default ``default_source``) on ``source_target(target)``.
  takes_source: bool = False
  default_source: dict | None = None
  # Spec options a sweep may vary inside one compiled step (``pemn_jax.sweep``):
  # ``hyperparams()`` turns them into arrays, ``with_hyperparams`` takes them
  # back (traced). Options not listed change shapes or Python control flow.
  traced: tuple[str, ...] = ()

  @classmethod
  def source_target(cls, target):
    """The params target its source is built on (default: the same)."""
    return target

  def __init__(self, target):
    self.leaves: dict[str, jax.ShapeDtypeStruct]
    self.leaves, self.order = _check_target(target)
    self.target = unflatten({p: self.leaves[p] for p in self.order})

  def select(self, pattern) -> list[str]:
    """The leaf paths (sorted) that ``pattern`` picks; see ``select_paths``."""
    return select_paths(list(self.leaves), pattern, self.order)

  @property
  def selected(self) -> list[str] | None:
    """The leaves this parameterization's ``select`` option picked (None if it
    has no such option); model files store this list instead of the pattern."""
    return None

  @property
  def num_params(self) -> int:
    """N: the number of parameters of the model (all leaves)."""
    return sum(size(v.shape) for v in self.leaves.values())

  @abc.abstractmethod
  def init(self, key) -> PyTree:
    """The trainable state (a pytree of float arrays, possibly empty)."""

  @abc.abstractmethod
  def materialize(self, state, seed, rng=None) -> PyTree:
    """The model's params pytree (nested dict, shapes and dtypes of target)."""

  def regularizer(self, state, seed, step=0) -> jax.Array:
    """An extra loss term; ``step`` (the train step, traced) lets it ramp."""
    del state, seed, step
    return jnp.zeros((), jnp.float32)

  @property
  def has_regularizer(self) -> bool:
    """Whether ``regularizer`` adds a term (the trainer then logs it apart
    from the task loss)."""
    return type(self).regularizer is not Parameterization.regularizer

  def metrics(self, state, seed, step=0) -> dict[str, jax.Array]:
    """Scalars describing the state that the trainer logs (at each log step)."""
    del state, seed, step
    return {}

  def goals(self, state, seed) -> list[dict]:
    """What the user asked of training that it may miss (e.g. a sparsity a
    regularizer drives towards), checked at the end of a run: a list of
    ``{'what', 'asked', 'reached', 'met', 'hint'}`` (empty: nothing to check)."""
    del state, seed
    return []

  def project(self, state):
    """The state after an optimizer update, projected onto its constraint set
    (identity by default; e.g. gates kept in [0, 1])."""
    return state

  def eval_rngs(self, seed) -> jax.Array | None:
    """Keys of the sampled networks whose predictions evaluation averages
    (a stochastic method's expected-value eval), or None: evaluate the single
    network ``materialize(state, seed)`` (``rng=None``)."""
    del seed
    return None

  @abc.abstractmethod
  def storage_bits(self) -> dict[str, int]:
    """Bits a compact model file needs, by component (seed and config aside)."""

  @abc.abstractmethod
  def export(self, state, seed) -> dict[str, jax.Array]:
    """What a model file stores, ``{name: array}``: float arrays, and boolean
    arrays under names starting with ``mask/``. Nothing derivable from the
    seed and the config is included, except random values a file keeps for
    portability (prototypes)."""

  @abc.abstractmethod
  def from_export(self, arrays, seed) -> PyTree:
    """Params rebuilt from ``export``'s arrays: bit-identical to
    ``materialize(state, seed)`` (with the arrays stored as float32)."""

  def hyperparams(self) -> dict:
    """The numeric values behind this parameterization's ``traced`` options
    (``own_hyperparams``) and its source's (under ``'source'``), computed
    here in Python exactly as the untraced code computes them.

    Returns:
      A pytree of numpy scalars/arrays (empty when nothing can be traced).
    """
    h = self.own_hyperparams()
    src = getattr(self, 'source', None)
    src = src.hyperparams() if isinstance(src, Parameterization) else {}
    return {**h, 'source': src} if src else h

  def own_hyperparams(self) -> dict:
    """This class's part of ``hyperparams()`` (none by default)."""
    return {}

  def use_hyperparams(self, own: dict):
    """Takes this class's part of ``hyperparams()`` (possibly traced) instead
    of its options; called on a copy by ``with_hyperparams``."""
    raise NotImplementedError(f'{type(self).__name__} has no traced options')

  def with_hyperparams(self, hyper) -> Parameterization:
    """A shallow copy that uses ``hyper`` (``hyperparams()``'s structure, e.g.
    traced per-variant values under ``jax.vmap``) instead of its own options.

    Args:
      hyper: the values, as ``hyperparams()`` returns them.
    Returns:
      The copy (this object when ``hyper`` is empty).
    """
    if not hyper:
      return self
    out = copy.copy(self)
    if 'source' in hyper:
      out.source = self.source.with_hyperparams(hyper['source'])
    own = {k: v for k, v in hyper.items() if k != 'source'}
    if own:
      out.use_hyperparams(own)
    return out

  def num_trainable(self) -> int:
    return sum(size(x.shape) for x in jax.tree.leaves(jax.eval_shape(self.init, jax.random.key(0))))


class Split(Parameterization):
  """A parameterization that *generates* the leaves matching ``select`` and
  treats the others (norm scales, biases, ...) per ``rest``: ``'train'`` (plain
  trained params) or ``'fixed'`` (initial values from the seed, never trained).
  """

  def __init__(self, target, select: str = KERNELS, rest: str = 'train', gain: float = 2.0):
    super().__init__(target)
    if rest not in RESTS:
      raise ValueError(f'rest must be one of {RESTS}, got {rest!r}')
    self.selection, self.rest, self.gain = select, rest, float(gain)
    self.generated = self.select(select)
    if not self.generated:
      raise ValueError(f'select={select!r} matches no leaf of the target; leaves: '
                       f'{sorted(self.leaves)}')
    self.others = [p for p in self.leaves if p not in set(self.generated)]
    if not (math.isfinite(self.gain) and self.gain > 0):
      raise ValueError(f'gain must be a finite number > 0, got {gain!r}')

  @property
  def selected(self):
    return list(self.generated)

  def init_rest(self, key) -> dict:
    if self.rest == 'fixed':
      return {}
    return unflatten(init_leaves({p: self.leaves[p] for p in self.others}, key, self.gain))

  def rest_params(self, rest_state, seed) -> dict[str, jax.Array]:
    if self.rest == 'train':
      return flatten(rest_state)
    return init_leaves({p: self.leaves[p] for p in self.others}, leaf_key(seed, 'rest'), self.gain)

  def rest_bits(self) -> dict[str, int]:
    n = sum(size(self.leaves[p].shape) for p in self.others)
    return {'rest_floats': 32 * n} if self.rest == 'train' else {}

  @abc.abstractmethod
  def generate(self, state, seed) -> dict[str, jax.Array]:
    """Values of the generated leaves, ``{path: array}``."""

  @abc.abstractmethod
  def export_generated(self, state, seed) -> dict[str, jax.Array]:
    """The arrays ``generate_from_export`` needs."""

  @abc.abstractmethod
  def generate_from_export(self, arrays, seed) -> dict[str, jax.Array]:
    """``generate``'s values from ``export_generated``'s arrays."""

  def _assemble(self, flat):
    return unflatten({p: flat[p].astype(self.leaves[p].dtype) for p in self.leaves})

  def materialize(self, state, seed, rng=None):
    del rng
    flat = self.generate(state, seed)
    flat.update(self.rest_params(state.get('rest', {}), seed))
    return self._assemble(flat)

  def export(self, state, seed):
    out = dict(self.export_generated(state, seed))
    if self.rest == 'train':
      out.update(sections.nest(sections.REST, flatten(state['rest'])))
    return out

  def from_export(self, arrays, seed):
    flat = self.generate_from_export(arrays, seed)
    flat.update(self.rest_params(unflatten(sections.part(sections.REST, arrays)), seed))
    return self._assemble(flat)


class Composed(Parameterization):
  """A parameterization composed over another one, its ``source`` (built
  first, on ``source_target(target)``), as optax chains transformations.

  Its state is ``{'source': the source's state, **own}``. The regularizer,
  logged metrics, projection, model-file sections, storage and traced
  hyperparameters are the source's plus its own parts, which subclasses give
  by overriding the ``own_*`` methods; ``init``, ``materialize`` and
  ``apply_export`` (params from the source's rebuilt params and the file's
  own sections) are theirs to write.

  Args:
    source: the built source parameterization.
    target: the model's params (default: the source's).
  """

  takes_source = True

  def __init__(self, source: Parameterization, target=None):
    if not isinstance(source, Parameterization):
      raise TypeError(f'{type(self).__name__} needs a Parameterization as source, got '
                      f'{type(source)}')
    super().__init__(source.target if target is None else target)
    self.source = source

  def own_regularizer(self, state, seed, step) -> jax.Array | None:
    """This class's loss term (None: none)."""
    del state, seed, step
    return None

  def own_metrics(self, state, seed, step) -> dict[str, jax.Array]:
    del state, seed, step
    return {}

  def own_project(self, state) -> dict:
    """This class's part of the state after an update (all but ``'source'``)."""
    return {k: v for k, v in state.items() if k != sections.SOURCE}

  def own_export(self, state, seed) -> dict[str, jax.Array]:
    """This class's model-file sections (the source's are added under ``source/``)."""
    del state, seed
    return {}

  def own_storage_bits(self) -> dict[str, int]:
    return {}

  @abc.abstractmethod
  def apply_export(self, source_params, arrays, seed) -> PyTree:
    """Params from the source's rebuilt params and this class's own sections."""

  def regularizer(self, state, seed, step=0):
    src = self.source.regularizer(state[sections.SOURCE], seed, step)
    own = self.own_regularizer(state, seed, step)
    return src if own is None else own + src

  @property
  def has_regularizer(self) -> bool:
    return (self.source.has_regularizer
            or type(self).own_regularizer is not Composed.own_regularizer)

  def metrics(self, state, seed, step=0):
    return {**self.source.metrics(state[sections.SOURCE], seed, step),
            **self.own_metrics(state, seed, step)}

  def own_goals(self, state, seed) -> list[dict]:
    del state, seed
    return []

  def goals(self, state, seed):
    return self.source.goals(state[sections.SOURCE], seed) + self.own_goals(state, seed)

  def project(self, state):
    return {**self.own_project(state),
            sections.SOURCE: self.source.project(state[sections.SOURCE])}

  def export(self, state, seed):
    out = sections.nest(sections.SOURCE, self.source.export(state[sections.SOURCE], seed))
    out.update(self.own_export(state, seed))
    return out

  def from_export(self, arrays, seed):
    source_params = self.source.from_export(sections.part(sections.SOURCE, arrays), seed)
    return self.apply_export(source_params, arrays, seed)

  def storage_bits(self):
    return {**self.source.storage_bits(), **self.own_storage_bits()}
