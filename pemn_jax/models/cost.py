"""What a declared model costs, from abstract shapes only, checked against limits.

A model file (or any untrusted description) names a model and its kwargs; a
few hundred bytes can declare a network that takes gigabytes to build or
hours to trace. ``check`` finds out before anything is allocated or
compiled: the model is traced abstractly (``jax.eval_shape``; Linen module
calls are counted while tracing, so an absurdly deep model is stopped after
``max_module_calls`` calls, not traced to the end), then its inference
program on one example (``jax.make_jaxpr``) gives the number of operations
and the largest working set of one operation (its inputs and outputs: what
must be in memory at once per example, a lower bound on the peak).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp
from flax import linen as nn


class CostError(ValueError):
  """A model that exceeds a limit (the message names the limit and how to raise it)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a model loaded from a file may cost (raise them for bigger models).

  Attributes:
    max_params: parameters (2^27: 512 MiB as float32; ViT-B is 86M).
    max_module_calls: Linen module calls of one forward pass (a depth bound:
      ResNet-152 makes ~500; tracing takes ~4 ms a call, so the bound also
      caps the time to refuse a too-deep model at a few seconds).
    max_ops: operations of the inference program of one example (a compile
      size bound).
    max_example_bytes: the largest operation's inputs + outputs for one
      example (an activation bound: 256 MiB is a 1024x1024x64 float32 map).
  """
  max_params: int = 1 << 27
  max_module_calls: int = 1_000
  max_ops: int = 200_000
  max_example_bytes: int = 1 << 28


def bounded(model, max_module_calls: int | None):
  """A context in which tracing ``model`` stops with CostError after
  ``max_module_calls`` Linen module calls (nothing for None, or for an NNX
  model: built as declared, the registry's have fixed depths)."""
  if max_module_calls is None or not isinstance(model, nn.Module):
    return contextlib.nullcontext()
  calls = [0]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      calls[0] += 1
      if calls[0] > max_module_calls:
        raise CostError(f'the model makes more than max_module_calls={max_module_calls} module '
                        'calls in one forward pass (too deep)')
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(interceptor)


def _ops(jaxpr):
  """Every equation of ``jaxpr``, sub-programs (jit, scan, cond) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _ops(inner)


def _bytes(v) -> int:
  aval = getattr(v, 'aval', None)
  shape, dtype = getattr(aval, 'shape', None), getattr(aval, 'dtype', None)
  if shape is None or dtype is None:
    return 0
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def measure(model, input_shape, max_module_calls: int | None = None, variables=None) -> dict:
  """The cost of ``model`` on inputs of ``input_shape`` (one example, no batch axis).

  Args:
    model: a Linen module or ``NNXModel``.
    input_shape: one example's shape.
    max_module_calls: stop tracing after this many Linen module calls.
    variables: the model's ``abstract_variables`` if already traced.
  Returns:
    ``params`` (count), ``param_bytes``, ``ops`` (equations of the inference
    program of one example), ``example_bytes`` (the largest inputs +
    outputs of one of its operations) and ``activation_bytes`` (the outputs
    of all its operations: an upper estimate of the activations one example
    makes).
  Raises:
    CostError: more than ``max_module_calls`` module calls.
  """
  from pemn_jax import models
  if variables is None:
    variables = models.abstract_variables(model, tuple(input_shape), max_module_calls)
  leaves = jax.tree.leaves(variables.get('params', {}))
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)

  def forward(v, x):
    with bounded(model, max_module_calls):
      return model.apply(v, x, train=False)

  jaxpr = jax.make_jaxpr(forward)(variables, x).jaxpr
  ops = peak = made = 0
  for eqn in _ops(jaxpr):
    ops += 1
    out = sum(_bytes(v) for v in eqn.outvars)
    peak, made = max(peak, out + sum(_bytes(v) for v in eqn.invars)), made + out
  return {'params': sum(math.prod(p.shape) for p in leaves),
          'param_bytes': sum(math.prod(p.shape) * p.dtype.itemsize for p in leaves),
          'ops': ops, 'example_bytes': peak, 'activation_bytes': made}


def check(model, input_shape, limits: Limits = Limits(), variables=None) -> dict:
  """``measure``, refused (CostError naming the limit) beyond ``limits``."""
  cost = measure(model, input_shape, limits.max_module_calls, variables)
  for key, limit, what in (('params', limits.max_params, 'parameters'),
                           ('ops', limits.max_ops, 'operations in its inference program'),
                           ('example_bytes', limits.max_example_bytes,
                            'bytes for one operation on one example (activations)')):
    if cost[key] > limit:
      raise CostError(f'the model has {cost[key]:,} {what}, more than max_{key}={limit:,}')
  return cost


def batch_within(cost: dict, batch_size: int, max_bytes: int) -> int:
  """The largest batch size <= ``batch_size`` whose largest operation fits
  ``max_bytes`` (at least 1)."""
  per = max(1, cost['example_bytes'])
  return max(1, min(batch_size, max_bytes // per))
