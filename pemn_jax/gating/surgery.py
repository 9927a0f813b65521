"""Physical slicing of a gated model: closed channels and branches removed.

``slice_params`` turns a gated model's params (whatever parameterization made
them: a network from generated weights is simply its materialized params,
frozen) into an ordinary smaller model of the same registry class: new
kwargs (narrower layers, removed branches), and params / batch statistics
cut along the axes the model's ``GateStructure`` names. The sliced model
computes the same function as the gated one with its gates fixed (up to
float error), with really fewer parameters and FLOPs.
"""

from __future__ import annotations

import numpy as np

from pemn_jax import models
from pemn_jax.pytrees import flatten, unflatten


class SliceError(ValueError):
  """The gates cannot be sliced (they cut every path to the output)."""


def open_gates(params, structure) -> dict[str, np.ndarray]:
  """The 0/1 effective gates (bool arrays) of a gated model's params."""
  flat = flatten(params)
  raw = {g: np.asarray(flat[g]) > 0.5 for g in structure.gates}
  eff = dict(raw)
  for b, inner in structure.any_of.items():
    eff[b] = raw[b] & raw[inner].any()
  return eff


def slice_params(model_name: str, model_kwargs: dict, num_classes: int, input_shape,
                 params, model_state=None):
  """(sliced model, its kwargs, params, model_state) of a gated model.

  Args:
    model_name: the registry name of the gated model.
    model_kwargs: its kwargs (with ``gates=True``).
    num_classes, input_shape: as the model was built.
    params: its params, gate leaves included (0/1).
    model_state: its non-param collections (batch statistics), if any.
  Returns:
    ``(model, kwargs, params, model_state)`` of the sliced ordinary model.
  Raises:
    SliceError: the gates close every path from the input to the output.
  """
  model = models.get(model_name, num_classes=num_classes, **model_kwargs)
  if not hasattr(model, 'gate_structure') or not model_kwargs.get('gates'):
    raise SliceError(f'model {model_name!r} was not trained with gates (model_kwargs.gates); '
                     'slice a run of configs/polarization.py')
  structure = model.gate_structure()
  missing = [g for g in structure.gates if g not in flatten(params)]
  if missing:
    raise SliceError(f'the params have no gates ({missing[0]}, ...): slice a run trained with '
                     'gates (configs/polarization.py, model_kwargs.gates=true)')
  gates = open_gates(params, structure)
  try:
    new_kwargs = {**model_kwargs, **structure.rebuild(gates)}
  except ValueError as e:
    raise SliceError(str(e)) from None
  new_model = models.get(model_name, num_classes=num_classes, **new_kwargs)
  target = models.abstract_variables(new_model, tuple(input_shape))
  old = {'params': params, **(model_state or {})}
  out = {}
  for collection, tree in target.items():
    source = flatten(old[collection])
    sliced = {}
    for path, want in flatten(tree).items():
      x = np.asarray(source[path])
      for f in structure.leaves.get(path, []):
        if f.axis is not None:
          keep = np.flatnonzero(f.expand(gates[f.gate], x.shape[f.axis]))
          x = np.take(x, keep, axis=f.axis)
      if x.shape != tuple(want.shape):
        raise SliceError(f'slicing {collection}/{path} gave shape {x.shape}, the sliced model '
                         f'needs {tuple(want.shape)}')
      sliced[path] = x
    out[collection] = unflatten(sliced)
  params_out = out.pop('params')
  return new_model, new_kwargs, params_out, out
