"""Parameterizations: pure functions from a small trainable state to params.

``build(spec, target)`` makes one from a plain dict / ConfigDict, e.g.::

    {'name': 'masked', 'keep': 0.5,
     'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3}}
"""

from __future__ import annotations

from collections.abc import Mapping

from pemn_jax.params.base import KERNELS, Parameterization, Split, flatten, unflatten
from pemn_jax.params.dense import Dense
from pemn_jax.params.masks import Masked
from pemn_jax.params.prototype import Prototype, rp_length
from pemn_jax.params.ring import Ring

REGISTRY = {'dense': Dense, 'ring': Ring, 'prototype': Prototype, 'masked': Masked}


def build(spec: Mapping, target) -> Parameterization:
  """Builds a (possibly composed) parameterization from a spec mapping.

  Args:
    spec: ``{'name': ..., options..., 'source': {...}}`` (dict or ConfigDict).
    target: the model's params pytree of shapes.
  Returns:
    The parameterization; its ``spec`` attribute is the spec it was built from
    (defaults made explicit for ``source``).
  """
  spec = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  full = dict(spec)
  name = spec.pop('name', None)
  if name not in REGISTRY:
    raise ValueError(f'unknown parameterization {name!r}; known: {sorted(REGISTRY)}')
  cls = REGISTRY[name]
  if name == 'masked':
    source = spec.pop('source', {'name': 'prototype', 'mode': 'dense'})
    args = (build(source, target),)
    full['source'] = args[0].spec
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


__all__ = ['KERNELS', 'REGISTRY', 'Dense', 'Masked', 'Parameterization', 'Prototype', 'Ring',
           'Split', 'build', 'flatten', 'resolved_spec', 'rp_length', 'unflatten']
