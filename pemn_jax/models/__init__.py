"""Flax models (Linen or NNX) and a name -> constructor registry.

``get(name, num_classes=10, **kwargs)`` builds one: a registry name, or a
user model given by import path ``'package.module:Constructor'``; an
``nnx.Module`` class becomes an ``NNXModel`` (see ``nnx_adapter``).
``register(name, constructor)`` adds one to the registry.
``abstract_params(model, input_shape)`` gives the params pytree of shapes a
parameterization targets; ``init_model_state(model, input_shape)`` gives the
non-param collections (``batch_stats``, NNX state) without materializing the
params.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from pemn_jax.kernels import conv
from pemn_jax.models import cost
from pemn_jax.models.convmixer import ConvMixer
from pemn_jax.models.layers import DepthwiseConv
from pemn_jax.models.mlp import MLP, LeNet5
from pemn_jax.models.nnx_adapter import NNXModel, is_nnx_class
from pemn_jax.models.nnx_models import LeNet5NNX, ResNetNNX, cifar_resnet_nnx
from pemn_jax.models.resnet import ResNet, cifar_resnet, resnet18, resnet_imagenet
from pemn_jax.models.vit import ViT

REGISTRY = {
    'mlp': MLP,
    'lenet5': LeNet5,
    'resnet8': functools.partial(cifar_resnet, 8),
    'resnet20': functools.partial(cifar_resnet, 20),
    'resnet32': functools.partial(cifar_resnet, 32),
    'resnet56': functools.partial(cifar_resnet, 56),
    'resnet18': resnet18,
    'resnet18_imagenet': functools.partial(resnet_imagenet, 18),
    'resnet34': functools.partial(resnet_imagenet, 34),
    'resnet50': functools.partial(resnet_imagenet, 50),
    'convmixer': ConvMixer,
    'convmixer_256_6': functools.partial(ConvMixer, dim=256, depth=6, kernel_size=5, patch_size=2),
    'convmixer_256_8': functools.partial(ConvMixer, dim=256, depth=8, kernel_size=5, patch_size=2),
    'vit': ViT,
    'lenet5_nnx': LeNet5NNX,
    'resnet20_nnx': functools.partial(cifar_resnet_nnx, 20),
}
IMPORT_PATH = re.compile(r'^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$')


def register(name: str, constructor, replace: bool = False):
  """Adds a model constructor to the registry.

  Args:
    name: the name configs and model files use.
    constructor: a Linen module class or factory, or an ``nnx.Module`` class
      (it is given ``num_classes`` if it takes it, and ``rngs`` if NNX).
    replace: allow replacing an existing name.
  """
  if name in REGISTRY and not replace:
    raise ValueError(f'model {name!r} is already registered (replace=True to replace it)')
  if not callable(constructor):
    raise TypeError(f'a model constructor must be callable, got {constructor!r}')
  REGISTRY[name] = constructor


def import_object(path: str):
  """``'package.module:Attr'`` -> the object (the caller chose to import it)."""
  if not IMPORT_PATH.match(path):
    raise ValueError(f'{path!r} is not a registry model nor an import path package.module:Attr')
  module_name, attr = path.split(':')
  try:
    obj = importlib.import_module(module_name)
    for part in attr.split('.'):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'cannot import model {path!r}: {e}') from None
  return obj


def is_known(name: str) -> bool:
  """A registry name or a well-formed import path."""
  return name in REGISTRY or bool(IMPORT_PATH.match(name))

def uses_batch_norm(model, input_shape=(32, 32, 3), **kwargs) -> bool:
  """Whether a model normalizes its layers with batch norm (the presets give
  such models their SGD recipe), read off the model itself: its variables
  have a ``batch_stats`` collection (Linen ``BatchNorm``, NNX ``BatchStat``).

  Args:
    model: a model, or its registry name / import path.
    input_shape: an example's shape (to trace the model's init).
    **kwargs: the constructor's arguments (with a name).
  Returns:
    True when it keeps batch statistics.
  """
  if isinstance(model, str):
    return _uses_batch_norm(model, tuple(input_shape), json.dumps(kwargs, sort_keys=True))
  with conv.forced('xla'):  # traced without starting a backend (config files run early)
    return 'batch_stats' in abstract_variables(model, tuple(input_shape))


@functools.lru_cache(maxsize=64)
def _uses_batch_norm(name: str, input_shape, kwargs: str) -> bool:
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(kwargs).items()}
  return uses_batch_norm(get(name, **kwargs), input_shape)


def get(name: str, num_classes: int = 10, **kwargs):
  """A model by registry name or import path (``'package.module:Constructor'``).

  Args:
    name: the model.
    num_classes: given to constructors that take it.
    **kwargs: the constructor's other arguments.
  Returns:
    A Linen module, or an ``NNXModel`` for NNX classes.
  """
  if name in REGISTRY:
    ctor = REGISTRY[name]
  elif IMPORT_PATH.match(name):
    ctor = import_object(name)
  else:
    raise ValueError(f'unknown model {name!r}; known: {sorted(REGISTRY)} or an import path '
                     'package.module:Constructor')
  return build(ctor, num_classes, kwargs, name)


def build(ctor, num_classes: int = 10, kwargs=None, name=None):
  """A model from its constructor (Linen module class / factory, or NNX
  class / factory taking ``rngs``); ``num_classes`` if it takes it."""
  kwargs = dict(kwargs or {})
  target = ctor.func if isinstance(ctor, functools.partial) else ctor
  takes = {}
  try:
    takes = inspect.signature(target).parameters
    if 'num_classes' in takes or any(p.kind == p.VAR_KEYWORD for p in takes.values()):
      kwargs = {'num_classes': num_classes, **kwargs}
  except (TypeError, ValueError):  # no signature: give it everything
    kwargs = {'num_classes': num_classes, **kwargs}
  if not (inspect.isclass(target) or inspect.isfunction(target) or inspect.ismethod(target)):
    raise ValueError(f'{name or ctor!r} is a {type(target).__name__}, not a model: give a Flax '
                     'module class (Linen or NNX) or a function that returns one')
  try:
    if is_nnx_class(target) or 'rngs' in takes:  # an NNX module class or factory
      return NNXModel(ctor, **kwargs)
    model = ctor(**kwargs)
  except TypeError as e:
    raise ValueError(f'bad options for model {name or ctor!r}: {e}') from None
  if not isinstance(model, (nn.Module, NNXModel)):
    raise ValueError(f'{name or ctor!r} returned a {type(model).__name__}, not a Flax module')
  return model


def _dummy(input_shape):
  return jnp.zeros((1, *input_shape), jnp.float32)


def abstract_variables(model, input_shape, max_module_calls: int | None = None):
  """All variable collections as ShapeDtypeStructs (nothing is computed);
  ``max_module_calls``: stop (``cost.CostError``) a Linen model making more.

  Dicts come back in the order ``model.init`` creates the variables (module
  execution order for compact modules), not JAX's sorted pytree order: named
  leaf selections such as ``'@stages'`` (stem and classifier left out) rely
  on it.
  """
  orders = {}

  def init(key, x):  # a fresh closure each call: eval_shape caches traces
    with cost.bounded(model, max_module_calls):
      variables = model.init(key, x)
    for col, tree in variables.items():
      orders[col] = list(traverse_util.flatten_dict(tree))
    return variables

  shapes = jax.eval_shape(lambda: init(jax.random.key(0), _dummy(input_shape)))
  out = {}
  for col, tree in shapes.items():
    flat = traverse_util.flatten_dict(tree)
    out[col] = traverse_util.unflatten_dict({k: flat[k] for k in orders.get(col, flat)})
  return out


def abstract_params(model, input_shape):
  """The params pytree of shapes (a parameterization's target), in creation order."""
  return abstract_variables(model, input_shape)['params']


def init_model_state(model, input_shape, key=None):
  """Initial non-param collections (e.g. ``batch_stats``).

  Batch-norm statistics are known without running the model (mean 0, var 1);
  any other collection comes from ``model.init`` under jit with the params
  dropped, so XLA never computes them.
  """
  shapes = {c: v for c, v in abstract_variables(model, input_shape).items() if c != 'params'}
  if set(shapes) <= {'batch_stats'}:
    def stat(path, x):
      name = path[-1].key if hasattr(path[-1], 'key') else str(path[-1])
      return (jnp.ones if name == 'var' else jnp.zeros)(x.shape, x.dtype)
    return jax.tree_util.tree_map_with_path(stat, shapes)
  key = jax.random.key(0) if key is None else key

  def f(k):
    variables = model.init(k, _dummy(input_shape))
    return {c: v for c, v in variables.items() if c != 'params'}

  return jax.jit(f)(key)


__all__ = ['REGISTRY', 'ConvMixer', 'DepthwiseConv', 'LeNet5', 'LeNet5NNX', 'MLP',
           'NNXModel', 'ResNet', 'ResNetNNX', 'ViT', 'abstract_params', 'abstract_variables',
           'build', 'cifar_resnet', 'get', 'import_object', 'init_model_state', 'is_known',
           'register', 'resnet18', 'resnet_imagenet', 'uses_batch_norm']
