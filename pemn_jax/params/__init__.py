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
  """Builds a (possibly composed) parameterization from a spec mapping."""
  spec = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  name = spec.pop('name', None)
  if name not in REGISTRY:
    raise ValueError(f'unknown parameterization {name!r}; known: {sorted(REGISTRY)}')
  cls = REGISTRY[name]
  if name == 'masked':
    source = spec.pop('source', {'name': 'prototype', 'mode': 'dense'})
    args = (build(source, target),)
  else:
    args = (target,)
  try:
    return cls(*args, **spec)
  except TypeError as e:
    raise ValueError(f'bad options for parameterization {name!r}: {e}') from None


__all__ = ['KERNELS', 'REGISTRY', 'Dense', 'Masked', 'Parameterization', 'Prototype', 'Ring',
           'Split', 'build', 'flatten', 'rp_length', 'unflatten']
