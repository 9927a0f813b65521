"""Flax models and a name -> constructor registry.

``get(name, num_classes=10, **kwargs)`` builds one; ``abstract_params(model,
input_shape)`` gives the params pytree of shapes a parameterization targets;
``init_model_state(model, input_shape)`` gives the non-param collections
(``batch_stats``) without materializing the params.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from pemn_jax.models.convmixer import ConvMixer
from pemn_jax.models.layers import DepthwiseConv
from pemn_jax.models.mlp import MLP, LeNet5
from pemn_jax.models.resnet import ResNet, cifar_resnet, resnet18
from pemn_jax.models.vit import ViT

REGISTRY = {
    'mlp': MLP,
    'lenet5': LeNet5,
    'resnet20': functools.partial(cifar_resnet, 20),
    'resnet32': functools.partial(cifar_resnet, 32),
    'resnet56': functools.partial(cifar_resnet, 56),
    'resnet18': resnet18,
    'convmixer': ConvMixer,
    'convmixer_256_6': functools.partial(ConvMixer, dim=256, depth=6, kernel_size=5, patch_size=2),
    'convmixer_256_8': functools.partial(ConvMixer, dim=256, depth=8, kernel_size=5, patch_size=2),
    'vit': ViT,
}

# Registry models whose every hidden layer is followed by batch norm (so the
# scale of their kernels does not change the function they compute).
BATCH_NORM = frozenset({'resnet20', 'resnet32', 'resnet56', 'resnet18', 'convmixer',
                        'convmixer_256_6', 'convmixer_256_8'})


def uses_batch_norm(name: str) -> bool:
  """Whether registry model ``name`` normalizes its layers with batch norm."""
  return name in BATCH_NORM


def get(name: str, num_classes: int = 10, **kwargs):
  if name not in REGISTRY:
    raise ValueError(f'unknown model {name!r}; known: {sorted(REGISTRY)}')
  try:
    return REGISTRY[name](num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise ValueError(f'bad options for model {name!r}: {e}') from None


def _dummy(input_shape):
  return jnp.zeros((1, *input_shape), jnp.float32)


def abstract_variables(model, input_shape):
  """All variable collections as ShapeDtypeStructs (nothing is computed).

  Dicts come back in the order ``model.init`` creates the variables (module
  execution order for compact modules), not JAX's sorted pytree order: named
  leaf selections such as ``'@stages'`` (stem and classifier left out) rely
  on it.
  """
  orders = {}

  def init(key, x):  # a fresh closure each call: eval_shape caches traces
    variables = model.init(key, x)
    for col, tree in variables.items():
      orders[col] = list(traverse_util.flatten_dict(tree))
    return variables

  shapes = jax.eval_shape(init, jax.random.key(0), _dummy(input_shape))
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


__all__ = ['BATCH_NORM', 'REGISTRY', 'ConvMixer', 'DepthwiseConv', 'LeNet5', 'MLP', 'ResNet', 'ViT',
           'abstract_params', 'abstract_variables', 'cifar_resnet', 'get', 'init_model_state',
           'resnet18', 'uses_batch_norm']
