"""Flax NNX models in pemn_jax: an ``nnx.Module`` seen as init/apply over
plain dicts, as the rest of the library sees Linen modules.

``NNXModel(Constructor, **kwargs)``'s ``init(key, x)`` builds the module
(``Constructor(**kwargs, rngs=nnx.Rngs(key))``) and ``nnx.split``s it into
collections: ``params`` (the ``nnx.Param`` variables, in the order
``__init__`` defines them), ``batch_stats`` (``nnx.BatchStat``) and
``nnx_state`` (everything else; keys as raw key data). ``apply(variables, x,
train=..., mutable=...)`` merges them back, switches ``train()``/``eval()``,
calls it and (with ``mutable``) returns the updated non-param collections.
Nothing else in the library knows whether a model is Linen or NNX.
"""

from __future__ import annotations

import inspect

import jax
from flax import nnx

from pemn_jax.pytrees import flatten, unflatten


def _definition_order(module, prefix=()) -> list[str]:
  """Param paths in the order the module's attributes were defined."""
  out = []
  for name, value in vars(module).items():
    if name.startswith('_'):
      continue
    if isinstance(value, nnx.Param):
      out.append('/'.join((*prefix, name)))
    elif isinstance(value, nnx.Module):
      out += _definition_order(value, (*prefix, name))
    elif isinstance(value, (list, tuple)):
      for i, v in enumerate(value):
        if isinstance(v, nnx.Module):
          out += _definition_order(v, (*prefix, name, str(i)))
  return out


def _to_plain(tree):
  """PRNG key arrays -> their raw data (uint32), so the state is plain arrays."""
  return jax.tree.map(lambda x: jax.random.key_data(x)
                      if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key)
                      else x, tree)


class NNXModel:
  """An NNX module class made to look like a Linen module to pemn_jax.

  Args:
    constructor: an ``nnx.Module`` subclass (or factory) taking ``rngs=``.
    **kwargs: its other constructor arguments.
  """

  def __init__(self, constructor, **kwargs):
    self.constructor, self.kwargs = constructor, dict(kwargs)
    defined = []

    def build():  # traced: nothing is allocated; the module as __init__ left it
      module = constructor(**kwargs, rngs=nnx.Rngs(0))
      defined.extend(_definition_order(module))

    jax.eval_shape(build)
    abstract = nnx.eval_shape(lambda: constructor(**kwargs, rngs=nnx.Rngs(0)))
    self.graphdef, params, stats, other = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    self._templates = (params, stats, other)
    flat = flatten(nnx.to_pure_dict(params))
    defined = [p for p in defined if p in flat]
    self.order = defined + [p for p in flat if p not in set(defined)]
    self._key_paths = {p for p, v in flatten(nnx.to_pure_dict(other)).items()
                       if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)}

  def __repr__(self):
    return f'NNXModel({getattr(self.constructor, "__name__", self.constructor)}, {self.kwargs})'

  def _collections(self, module) -> dict:
    _, params, stats, other = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    flat = flatten(nnx.to_pure_dict(params))
    out = {'params': unflatten({p: flat[p] for p in self.order})}
    if flatten(nnx.to_pure_dict(stats)):
      out['batch_stats'] = nnx.to_pure_dict(stats)
    if flatten(nnx.to_pure_dict(other)):
      out['nnx_state'] = _to_plain(nnx.to_pure_dict(other))
    return out

  def init(self, key, x=None):
    """The variable collections of a freshly built module (``x`` unused: NNX
    modules know their shapes at construction)."""
    del x
    return self._collections(self.constructor(**self.kwargs, rngs=nnx.Rngs(key)))

  def module(self, variables) -> nnx.Module:
    """The ``nnx.Module`` holding these variables."""
    params, stats, other = (jax.tree.map(lambda x: x, t) for t in self._templates)
    nnx.replace_by_pure_dict(params, variables['params'])
    if 'batch_stats' in variables:
      nnx.replace_by_pure_dict(stats, variables['batch_stats'])
    if 'nnx_state' in variables:
      flat = flatten(variables['nnx_state'])
      nnx.replace_by_pure_dict(other, unflatten({
          p: jax.random.wrap_key_data(v) if p in self._key_paths else v
          for p, v in flat.items()}))
    return nnx.merge(self.graphdef, params, stats, other)

  def apply(self, variables, x, train: bool = False, mutable=False):
    module = self.module(variables)
    if train:
      module.train()
    else:
      module.eval()
    y = module(x)
    if not mutable:
      return y
    new = self._collections(module)
    return y, {c: new[c] for c in (mutable if isinstance(mutable, (list, tuple)) else new)
               if c != 'params' and c in new}


def is_nnx_class(obj) -> bool:
  """Whether ``obj`` is an ``nnx.Module`` subclass."""
  return inspect.isclass(obj) and issubclass(obj, nnx.Module)
