"""Export a trained run to a ``.pemn`` model file, and load one.

``export_run`` reads the run's trained model (``train.run.restore``: its
newest good checkpoint, without the optimizer state) and writes the
parameterization's ``export`` arrays, the batch statistics and the header
(``model_header``: the one place a model file's header is made); ``load``
rebuilds a model and its params from a file, checking it first.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pemn_jax import __version__, models
from pemn_jax import params as param_lib
from pemn_jax.export import artifact, codecs
from pemn_jax.models import cost
from pemn_jax.params import sections
from pemn_jax.pytrees import all_finite, flatten, plain, unflatten
from pemn_jax.train.checkpoint import CheckpointError, discard_failed_save
from pemn_jax.train.run import restore
from pemn_jax.train.workdir import fs_error


def model_header(model: str, model_kwargs: dict, num_classes: int, input_shape,
                 param_spec: dict, seed: int, dataset: str, step: int) -> dict:
  """A model file's header (its sections are added by ``artifact.write``).

  Args:
    model, model_kwargs: the model's registry name (or import path) and kwargs.
    num_classes, input_shape: what it was built for.
    param_spec: the resolved parameterization spec (``params.resolved_spec``).
    seed: the seed its generated weights derive from.
    dataset, step: where it was trained, and for how long.
  Returns:
    The header, JSON-plain.
  """
  return plain({'format': 'pemn_jax model', 'pemn_jax_version': __version__,
                'jax_version': jax.__version__, 'model': model, 'model_kwargs': model_kwargs,
                'num_classes': int(num_classes), 'input_shape': list(input_shape),
                'param': param_spec, 'seed': int(seed), 'dataset': dataset, 'step': int(step)})


def export_run(workdir: str, out: str, float_codec: str = 'f32', mask_codec: str = 'auto',
               params_dir: str | None = None, slice_gates: bool = False, say=None,
               progress=None, float_bits: int | None = None) -> dict:
  """Writes ``out`` (.pemn) and, if ``params_dir``, an orbax checkpoint of the
  materialized dense params + model state. Returns sizes.

  Args:
    workdir: the run (its newest good checkpoint).
    out: the model file to write.
    float_codec, mask_codec: see ``artifact.write``.
    params_dir: also an orbax checkpoint of the dense params there.
    slice_gates: a gated run (polarization): freeze its gates and write the
      physically smaller ordinary model (dense params) instead.
    say: where to report a checkpoint skipped as corrupt (default: nowhere).
    progress: ``artifact.write``'s (e.g. ``cli.Eta``: a line with an ETA).
    float_bits: lossy: every float section (trained arrays, biases, norms,
      batch statistics) on its own uniform grid of ``2^float_bits - 1``
      levels through 0 (``codecs.Grid``), instead of ``float_codec``; masks
      are unchanged, and ``params_dir`` gets the params the file rebuilds.
  Returns:
    ``file_bytes``, ``num_params`` (of the written model), ``header``.
  Raises:
    CheckpointError: no checkpoint, or one whose state is not finite.
    SliceError: ``slice_gates`` on a run whose gates cannot be sliced.
  """
  run = restore(workdir, say=say)
  ts, config = run.train_state, run.config
  if not all_finite((ts.state, ts.model_state)):
    raise CheckpointError(f'the checkpoint of step {run.step} in {workdir} holds non-finite '
                          'values (a diverged run): not exporting it')
  model_name, model_kwargs = config.model, config.model_kwargs.to_dict()
  params, model_state, param = run.params(), ts.model_state, run.param
  sliced = None
  if slice_gates:
    from pemn_jax.gating import surgery
    before_kwargs, before = model_kwargs, run.param.num_params
    _, model_kwargs, params, model_state = surgery.slice_params(
        model_name, model_kwargs, run.num_classes, run.input_shape, params, model_state)
    param = param_lib.build({'name': 'dense'}, params)
    arrays, seed = param.export(params, 0), 0
    changed = {k: (plain(before_kwargs.get(k)), plain(v)) for k, v in model_kwargs.items()
               if plain(before_kwargs.get(k)) != plain(v) and k != 'gates'}
    sliced = {'params_before': before, 'params_after': param.num_params, 'changed': changed}
    if say is not None:
      say('sliced: ' + (', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())
                        or 'no width changed') +
          f'; params {before:,} -> {param.num_params:,} '
          f'({4 * before:,} -> {4 * param.num_params:,} bytes as float32)')
      if not changed:
        say('warning: no gate is closed, so slicing removed nothing (the gates only): the run '
            'did not reach a sparsity (its training log ends with the gate sparsity reached)')
  else:
    arrays, seed = jax.jit(param.export)(ts.state, ts.seed), int(ts.seed)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  arrays.update(sections.nest(sections.MODEL_STATE, {k: np.asarray(v) for k, v in
                                                     flatten(model_state).items()}))
  if float_bits is not None:
    arrays = {k: v if sections.is_mask(k) else codecs.Grid.of(v, float_bits)
              for k, v in arrays.items()}
    if params_dir:  # the params the file rebuilds, not the run's unrounded ones
      params, model_state = _rebuilt(arrays, param, seed)
  header = model_header(model_name, model_kwargs, run.num_classes, run.input_shape,
                        param_lib.resolved_spec(param), seed, config.dataset, run.step)
  if params_dir:  # first: a failure of either leaves neither under its final name
    _save_params(os.path.abspath(params_dir), {'params': params, **model_state})
  try:
    size = artifact.write(out, header, arrays, float_codec, mask_codec, progress)
  except BaseException:
    if params_dir:
      shutil.rmtree(params_dir, ignore_errors=True)
    raise
  result = {'file_bytes': size, 'num_params': param.num_params, 'header': header,
            **({'sliced': sliced} if sliced else {})}
  if params_dir:
    result['params_dir'] = params_dir
  return result


def _rebuilt(arrays: dict, param, seed: int):
  """(params, model state) that sections ``arrays`` (some of them
  ``codecs.Grid``) rebuild, as ``load`` would."""
  values = {k: v.dense() if isinstance(v, codecs.Grid) else v for k, v in arrays.items()}
  model_state = unflatten({k: jnp.asarray(v) for k, v in
                           sections.part(sections.MODEL_STATE, values).items()})
  params = jax.jit(param.from_export)(
      {k: jnp.asarray(v) for k, v in values.items()
       if not k.startswith(sections.MODEL_STATE + '/')}, jnp.uint32(seed))
  return params, model_state


def _save_params(path: str, tree):
  """An orbax checkpoint of ``tree`` at ``path``; ArtifactError (its
  temporary directory removed) if it cannot be written."""
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree, force=True)
    ckptr.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
    discard_failed_save(path)
    raise artifact.ArtifactError(fs_error(f'cannot write the dense params to {path}', e)) from e


def expected_sections(model, param, input_shape, variables=None
                      ) -> dict[str, tuple[tuple, bool]]:
  """``{section name: (shape, is_mask)}`` a file of this model must hold,
  derived from the parameterization's ``export`` and the model's collections
  (``variables``: its ``abstract_variables`` if known; nothing is allocated)."""
  state = jax.eval_shape(param.init, jax.random.key(0))
  out = jax.eval_shape(param.export, state, jnp.uint32(0))
  expected = {k: (tuple(v.shape), v.dtype == jnp.bool_) for k, v in out.items()}
  if variables is None:
    variables = models.abstract_variables(model, tuple(input_shape))
  states = flatten({c: t for c, t in variables.items() if c != 'params'})
  expected.update(sections.nest(sections.MODEL_STATE, {k: (tuple(v.shape), False)
                                                        for k, v in states.items()}))
  return expected


def load(path: str, limits: cost.Limits | None = None, model=None):
  """(header, model, params, model_state) from a ``.pemn`` file.

  The file names its model; no code is ever imported because a file says so:
  a registry model is built by name; a file made with a user model (an import
  path in the header) loads only when the caller passes ``model``. The header
  is parsed strictly and checked against a schema, the declared model's cost
  against ``limits`` (from abstract shapes: parameters, depth, operations,
  activations), every section against what the rebuilt model needs, before
  anything is decoded or allocated; rebuilt params must be finite.

  Args:
    path: the model file.
    limits: what the model may cost (default ``cost.Limits()``).
    model: the model's constructor or import path (the caller's choice), for
      files made with a user model; it is built with the file's kwargs.
  Returns:
    ``(header, model, params, model_state)``.
  Raises:
    ArtifactError: naming what is wrong with the file (or the limit it exceeds).
  """
  header, body, base = artifact.read_header(path)
  model, param, variables = rebuild(path, header, limits or cost.Limits(), model)
  try:
    expected = expected_sections(model, param, header['input_shape'], variables)
  except Exception as e:  # noqa: BLE001
    raise artifact.ArtifactError(f'{path!r}: cannot derive the sections of its model: '
                                 f'{type(e).__name__}: {str(e)[:300]}') from None
  arrays = artifact.decode_sections(path, header, body, base, expected)
  for k, v in arrays.items():
    if v.dtype != bool and not np.isfinite(v).all():
      raise artifact.ArtifactError(f'{path!r}: section {k!r} holds non-finite values')
  model_state = unflatten({k: jnp.asarray(v) for k, v in
                           sections.part(sections.MODEL_STATE, arrays).items()})
  state_arrays = {k: jnp.asarray(v) for k, v in arrays.items()
                  if not k.startswith(sections.MODEL_STATE + '/')}
  try:
    params = jax.jit(param.from_export)(state_arrays, jnp.uint32(header['seed']))
  except Exception as e:  # noqa: BLE001
    raise artifact.ArtifactError(f'{path!r}: cannot rebuild the params: {type(e).__name__}: '
                                 f'{str(e)[:300]}') from None
  if not all_finite(params):
    raise artifact.ArtifactError(f'{path!r}: its sections rebuild params that are not finite '
                                 '(a corrupted or crafted file)')
  return header, model, params, model_state


def rebuild(path: str, header: dict, limits: cost.Limits, model=None):
  """(model, parameterization, abstract variables) a checked header
  declares, its cost within ``limits`` (ArtifactError otherwise); nothing is
  allocated."""
  name = header['model']
  if model is None and name not in models.REGISTRY:
    raise artifact.ArtifactError(
        f'{path!r} was made with model {name!r}, which is not a registry model; no code is '
        'imported because a file names it: pass the model (load(path, model=...), evaluate '
        '--model=package.module:Constructor) to load it')
  try:
    if model is None:
      model = models.get(name, num_classes=header['num_classes'], **header['model_kwargs'])
    else:
      ctor = models.import_object(model) if isinstance(model, str) else model
      model = models.build(ctor, header['num_classes'], header['model_kwargs'], name)
    shape = tuple(header['input_shape'])
    variables = models.abstract_variables(model, shape, limits.max_module_calls)  # shapes only
    cost.check(model, shape, limits, variables)
    return model, param_lib.build(header['param'], variables['params'], model=model), variables
  except cost.CostError as e:
    raise artifact.ArtifactError(f'{path!r} declares a model beyond this loader\'s limits: {e} '
                                 '(a file you trust: raise the limit, e.g. evaluate '
                                 '--max_params / --max_module_calls / --max_example_mib)'
                                 ) from None
  except Exception as e:  # noqa: BLE001 - any failure to rebuild from header values
    raise artifact.ArtifactError(f'{path!r}: cannot rebuild the model from its header: '
                                 f'{type(e).__name__}: {str(e)[:300]}') from None
