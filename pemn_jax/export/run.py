"""Export a trained run (its latest checkpoint) to a ``.pemn`` file, and load one."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pemn_jax import __version__, models
from pemn_jax import params as P
from pemn_jax.export import artifact
from pemn_jax.params.base import flatten, unflatten
from pemn_jax.train.checkpoint import (
  Checkpointer,
  CheckpointError,
  replicated_sharding,
  with_sharding,
)
from pemn_jax.train.optim import make_optimizer, with_pruning
from pemn_jax.train.step import create_train_state

# A model file rebuilds a model of at most this many parameters unless the
# caller allows more (a crafted header could otherwise ask for terabytes).
MAX_PARAMS = 1 << 29


def build(model_name, model_kwargs, num_classes, input_shape, param_spec):
  """(model, parameterization) of a registry model name and a param spec."""
  model = models.get(model_name, num_classes=num_classes, **model_kwargs)
  param = P.build(param_spec, models.abstract_params(model, tuple(input_shape)), model=model)
  return model, param


def load_run(workdir: str, step: int | None = None):
  """(config, meta, model, param, train_state) of a run's checkpoint."""
  ckpt = Checkpointer(workdir, keep=1_000_000)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no checkpoint in {ckpt.directory}: train first (pemn_jax.main)')
  meta = ckpt.restore_meta(step)
  if 'num_classes' not in meta:
    raise CheckpointError(f'checkpoint step {step} in {ckpt.directory} has no model metadata '
                          '(written by an older pemn_jax); cannot export it')
  config = ml_collections.ConfigDict(meta['config'])
  model, param = build(config.model, config.model_kwargs.to_dict(), meta['num_classes'],
                       meta['input_shape'], config.param)
  def abstract_state(inject):
    tx, _ = make_optimizer(config.optimizer, 1, inject=inject)
    if 'prune' in config:
      tx = with_pruning(tx, config.prune, 1, config.seed, param)
    init = lambda: create_train_state(  # noqa: E731
        param, tx, jax.random.key(0),
        models.init_model_state(model, tuple(meta['input_shape'])), config.seed)
    # Onto this process's devices, whatever mesh and process count saved it.
    return init, with_sharding(jax.eval_shape(init), replicated_sharding())

  init, abstract = abstract_state(True)
  try:
    ts, _ = ckpt.restore(step, abstract)
  except CheckpointError as e:  # written before the optimizer held its hyperparameters?
    try:
      ts, _ = ckpt.restore(step, abstract_state(False)[1])
    except CheckpointError:
      raise e from None
    from pemn_jax.train.loop import upgrade_state
    ts = upgrade_state(jax.jit(init)(), ts)
  ckpt.close()
  return config, meta, model, param, ts


def _finite(tree) -> bool:
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def export_run(workdir: str, out: str, float_codec: str = 'f32', mask_codec: str = 'auto',
               params_dir: str | None = None, slice_gates: bool = False) -> dict:
  """Writes ``out`` (.pemn) and, if ``params_dir``, an orbax checkpoint of the
  materialized dense params + model state. Returns sizes.

  Args:
    workdir: the run.
    out: the model file to write.
    float_codec, mask_codec: see ``artifact.write``.
    params_dir: also an orbax checkpoint of the dense params there.
    slice_gates: a gated run (polarization): freeze its gates and write the
      physically smaller ordinary model (dense params) instead.
  Returns:
    ``file_bytes``, ``num_params`` (of the written model), ``header``.
  Raises:
    CheckpointError: no checkpoint, or one whose state is not finite.
    SliceError: ``slice_gates`` on a run whose gates cannot be sliced.
  """
  config, meta, model, param, ts = load_run(workdir)
  if not _finite((ts.state, ts.model_state)):
    raise CheckpointError(f'the checkpoint of step {meta["step"]} in {workdir} holds non-finite '
                          'values (a diverged run): not exporting it')
  model_name, model_kwargs = config.model, config.model_kwargs.to_dict()
  params = jax.jit(param.materialize)(ts.state, ts.seed)
  model_state = ts.model_state
  if slice_gates:
    from pemn_jax import surgery
    _, model_kwargs, params, model_state = surgery.slice_params(
        model_name, model_kwargs, meta['num_classes'], meta['input_shape'], params, model_state)
    param = P.build({'name': 'dense'}, params)
    arrays = {k: np.asarray(v) for k, v in param.export(params, 0).items()}
    seed = 0
  else:
    arrays = {k: np.asarray(v) for k, v in jax.jit(param.export)(ts.state, ts.seed).items()}
    seed = int(ts.seed)
  arrays.update({f'model_state/{k}': np.asarray(v) for k, v in flatten(model_state).items()})
  header = {'format': 'pemn_jax model', 'pemn_jax_version': __version__,
            'jax_version': jax.__version__, 'model': model_name,
            'model_kwargs': model_kwargs, 'num_classes': meta['num_classes'],
            'input_shape': list(meta['input_shape']), 'param': P.resolved_spec(param),
            'seed': seed, 'dataset': config.dataset, 'step': int(meta['step'])}
  size = artifact.write(out, _jsonable(header), arrays, float_codec, mask_codec)
  result = {'file_bytes': size, 'num_params': param.num_params, 'header': header}
  if params_dir:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(params_dir), {'params': params, **model_state}, force=True)
    ckptr.wait_until_finished()
    result['params_dir'] = params_dir
  return result


def _jsonable(x):
  """Tuples (ConfigDict values) as lists, recursively."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def expected_sections(model, param, input_shape) -> dict[str, tuple[tuple, bool]]:
  """``{section name: (shape, is_mask)}`` a file of this model must hold,
  derived from the parameterization's ``export`` and the model's collections
  (nothing is allocated)."""
  state = jax.eval_shape(param.init, jax.random.key(0))
  out = jax.eval_shape(param.export, state, jnp.uint32(0))
  sections = {k: (tuple(v.shape), v.dtype == jnp.bool_) for k, v in out.items()}
  variables = models.abstract_variables(model, tuple(input_shape))
  for k, v in flatten({c: t for c, t in variables.items() if c != 'params'}).items():
    sections[f'model_state/{k}'] = (tuple(v.shape), False)
  return sections


def load(path: str, max_params: int = MAX_PARAMS, model=None):
  """(header, model, params, model_state) from a ``.pemn`` file.

  The file names its model; no code is ever imported because a file says so:
  a registry model is built by name; a file made with a user model (an import
  path in the header) loads only when the caller passes ``model``. The header
  is checked against a schema, every section against what the rebuilt model
  needs, and the model's size against ``max_params``, before anything is
  decoded or allocated.

  Args:
    path: the model file.
    max_params: refuse models with more parameters than this.
    model: the model's constructor or import path (the caller's choice), for
      files made with a user model; it is built with the file's kwargs.
  Returns:
    ``(header, model, params, model_state)``.
  Raises:
    ArtifactError: naming what is wrong with the file.
  """
  header, body, base = artifact.read_header(path)
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
    target = models.abstract_params(model, tuple(header['input_shape']))  # shapes only
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))
    if n > max_params:
      raise artifact.ArtifactError(f'{path!r}: the model has {n} parameters, more than '
                                   f'max_params={max_params}')
    param = P.build(header['param'], target, model=model)
  except artifact.ArtifactError:
    raise
  except Exception as e:  # noqa: BLE001 - any failure to rebuild from header values
    raise artifact.ArtifactError(f'{path!r}: cannot rebuild the model from its header: '
                                 f'{type(e).__name__}: {str(e)[:300]}') from None
  try:
    expected = expected_sections(model, param, header['input_shape'])
  except Exception as e:  # noqa: BLE001
    raise artifact.ArtifactError(f'{path!r}: cannot derive the sections of its model: '
                                 f'{type(e).__name__}: {str(e)[:300]}') from None
  arrays = artifact.decode_sections(path, header, body, base, expected)
  for k, v in arrays.items():
    if v.dtype != bool and not np.isfinite(v).all():
      raise artifact.ArtifactError(f'{path!r}: section {k!r} holds non-finite values')
  state_arrays = {k: jnp.asarray(v) for k, v in arrays.items()
                  if not k.startswith('model_state/')}
  try:
    params = jax.jit(param.from_export)(state_arrays, jnp.uint32(header['seed']))
  except Exception as e:  # noqa: BLE001
    raise artifact.ArtifactError(f'{path!r}: cannot rebuild the params: {type(e).__name__}: '
                                 f'{str(e)[:300]}') from None
  model_state = unflatten({k[12:]: jnp.asarray(v) for k, v in arrays.items()
                           if k.startswith('model_state/')})
  return header, model, params, model_state
