"""A step as another platform would run it, proved from this host.

``jax.jit(f).trace(*args).lower(lowering_platforms=('tpu',))`` gives the
StableHLO a TPU would compile, from a CPU-only machine (``args`` may be
``jax.ShapeDtypeStruct``s). ``census`` counts what matters on accelerators:
custom calls (a CPU-only one cannot run there), scatters (XLA's scatter is a
known TPU pathology: openxla/xla#12982), sorts and gathers, with their sizes;
``problems`` names what breaks the rules a training step must keep.
"""

from __future__ import annotations

import math

import jax
from jax._src.lib.mlir import ir

# Custom-call targets XLA itself emits (sharding annotations and the like).
XLA_TARGETS = ('Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape', 'MoveToHost',
               'MoveToDevice', 'LayoutConstraint', 'annotate_device_placement')
LIMIT = 65536  # elements: a scatter or sort above max(LIMIT, D) is N-sized


def lower(fn, args, platforms=('tpu', 'cuda')):
  """``fn`` (jitted or not) lowered for ``platforms`` from this host."""
  fn = fn if hasattr(fn, 'trace') else jax.jit(fn)
  return fn.trace(*args).lower(lowering_platforms=tuple(platforms))


def _ops(op):
  for region in op.regions:
    for block in region.blocks:
      for o in block.operations:
        yield o.operation
        yield from _ops(o.operation)


def _size(value) -> int:
  return math.prod(ir.RankedTensorType(value.type).shape)


def census(lowered) -> dict:
  """The ops of a lowered program that matter on accelerators.

  Returns:
    ``{'custom_calls': [target, ...], 'scatters': [updates' element count,
    ...], 'sorts': [operand element count, ...], 'gathers': [result element
    count, ...], 'matmuls': [(op, operand element types), ...]}`` (matmuls:
    every convolution and dot product).
  """
  out = {'custom_calls': [], 'scatters': [], 'sorts': [], 'gathers': [], 'matmuls': []}
  for op in _ops(lowered.compiler_ir('stablehlo').operation):
    if op.name == 'stablehlo.custom_call':
      out['custom_calls'].append(ir.StringAttr(op.attributes['call_target_name']).value)
    elif op.name == 'stablehlo.scatter':  # operands: inputs, indices, updates (as many)
      n = (len(op.operands) - 1) // 2
      out['scatters'].append(sum(_size(v) for v in op.operands[n + 1:]))
    elif op.name == 'stablehlo.sort':
      out['sorts'].append(_size(op.operands[0]))
    elif op.name == 'stablehlo.gather':
      out['gathers'].append(_size(op.results[0]))
    elif op.name in ('stablehlo.convolution', 'stablehlo.dot_general'):
      out['matmuls'].append((op.name[10:], tuple(
          str(ir.RankedTensorType(v.type).element_type) for v in op.operands)))
  return out


def problems(counts: dict, dof: int = 0) -> list[str]:
  """What in ``census(...)`` breaks a training step's rules on accelerators:
  a custom call outside XLA's own, a scatter whose updates exceed
  ``max(LIMIT, dof)`` elements, a sort over ``>= LIMIT`` elements."""
  bound = max(LIMIT, int(dof))
  out = [f'custom call {t}' for t in counts['custom_calls'] if t not in XLA_TARGETS]
  out += [f'scatter of {n} updates (> {bound})' for n in counts['scatters'] if n > bound]
  out += [f'sort of {n} elements' for n in counts['sorts'] if n >= LIMIT]
  return out


def export(fn, args, platforms=('tpu', 'cuda'), **kwargs):
  """``fn`` exported (``jax.export``) for ``platforms`` with flat arguments
  and results, so the serialized artifact needs no pytree registration.

  Args:
    fn: the function (a train or evaluation step: ``train.loop.step_functions``).
    args: example arguments (arrays or ShapeDtypeStructs, any pytrees).
    platforms: where the artifact may run.
    **kwargs: for ``jax.export.export`` (e.g. ``disabled_checks``).
  Returns:
    ``(exported, output treedef)``; ``call(exported, treedef, args)`` runs it.
  """
  leaves, in_tree = jax.tree.flatten(args)
  out_tree = []

  def flat(*xs):
    out, tree = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, xs)))
    out_tree.append(tree)
    return out

  exported = jax.export.export(jax.jit(flat), platforms=list(platforms), **kwargs)(*leaves)
  return exported, out_tree[0]


def call(exported, out_tree, args):
  """Runs an ``export``-ed (or deserialized) function on ``args``."""
  return jax.tree.unflatten(out_tree, exported.call(*jax.tree.leaves(args)))
