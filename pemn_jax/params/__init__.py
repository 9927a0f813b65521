"""Parameterizations: pure functions from a small trainable state to params.

``build(spec, target)`` makes one from a plain dict / ConfigDict, e.g.::

    {'name': 'masked', 'keep': 0.5,
     'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3}}
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from pemn_jax.gating.param import Gated
from pemn_jax.params.base import KERNELS, Composed, Parameterization, Split
from pemn_jax.params.dense import Dense
from pemn_jax.params.masks import Masked
from pemn_jax.params.prototype import Prototype, rp_length
from pemn_jax.params.ring import Ring

REGISTRY = {'dense': Dense, 'ring': Ring, 'prototype': Prototype, 'masked': Masked,
            'gated': Gated}
CONTEXT = ('model', 'total_steps')  # what a build may hand to the classes that ask


def register(name: str, cls, replace: bool = False):
  """Makes a parameterization class available to ``build``, configs, the
  trainer and model files under ``name``.

  Args:
    name: the spec's ``name``.
    cls: a ``Parameterization`` subclass. Its constructor takes the target
      (or, with ``takes_source = True``, the built source) and the spec's
      options; it may also take ``model`` / ``total_steps`` (build context).
    replace: allow replacing an existing name.
  """
  if not (isinstance(cls, type) and issubclass(cls, Parameterization)):
    raise TypeError(f'{cls!r} is not a Parameterization subclass')
  if name in REGISTRY and not replace:
    raise ValueError(f'parameterization {name!r} is already registered (replace=True to '
                     'replace it)')
  REGISTRY[name] = cls


def build(spec: Mapping, target, **context) -> Parameterization:
  """Builds a (possibly composed) parameterization from a spec mapping.

  Args:
    spec: ``{'name': ..., options..., 'source': {...}}`` (dict or ConfigDict).
      A class with ``takes_source`` is built over ``source`` (its
      ``default_source`` if absent), itself built recursively on
      ``cls.source_target(target)``.
    target: the model's params pytree of shapes.
    **context: ``model`` (the Flax module), ``total_steps``: given to the
      classes whose constructor takes them.
  Returns:
    The parameterization; its ``spec`` attribute is the spec it was built from
    (defaults made explicit for ``source``).
  """
  spec = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  full = dict(spec)
  name = spec.pop('name', None)
  if name not in REGISTRY:
    raise ValueError(f'unknown parameterization {name!r}; known: {sorted(REGISTRY)} (one '
                     'registered by your code: import it with --import MODULE / config.imports)')
  cls = REGISTRY[name]
  accepts = inspect.signature(cls.__init__).parameters
  for key in CONTEXT:
    if key in spec:
      raise ValueError(f'{key!r} is not an option of parameterization {name!r}')
    if key in accepts and key in context:
      spec[key] = context[key]
  if cls.takes_source:
    source = build(spec.pop('source', cls.default_source), cls.source_target(target), **context)
    full['source'] = source.spec
    args = (source,)
    if 'target' in accepts:
      spec['target'] = target
  else:
    args = (target,)
  try:
    param = cls(*args, **spec)
  except TypeError as e:
    raise ValueError(f'bad options for parameterization {name!r}: {e}') from None
  param.spec = full
  return param


def resolved_spec(param: Parameterization) -> dict:
  """``param``'s spec with every leaf selection replaced by the list of leaf
  paths it picked: what a model file stores (no pattern is ever compiled from
  a file)."""
  if param.spec is None:
    raise ValueError(f'{type(param).__name__} was not made by params.build: it has no spec')
  spec = dict(param.spec)
  if param.selected is not None:
    spec['select'] = list(param.selected)
  if isinstance(getattr(param, 'source', None), Parameterization):
    spec['source'] = resolved_spec(param.source)
  return spec


__all__ = ['KERNELS', 'REGISTRY', 'Composed', 'Dense', 'Gated', 'Masked', 'Parameterization',
           'Prototype', 'Ring', 'Split', 'build', 'register', 'resolved_spec', 'rp_length']
