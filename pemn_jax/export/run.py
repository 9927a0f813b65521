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
from pemn_jax.train.checkpoint import Checkpointer, CheckpointError
from pemn_jax.train.optim import make_optimizer, with_pruning
from pemn_jax.train.step import create_train_state


def build(model_name, model_kwargs, num_classes, input_shape, param_spec):
  model = models.get(model_name, num_classes=num_classes, **model_kwargs)
  param = P.build(param_spec, models.abstract_params(model, tuple(input_shape)))
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
  tx, _ = make_optimizer(config.optimizer, 1)
  if 'prune' in config:
    tx = with_pruning(tx, config.prune, 1, config.seed, param)
  abstract = jax.eval_shape(lambda: create_train_state(
      param, tx, jax.random.key(0),
      models.init_model_state(model, tuple(meta['input_shape'])), config.seed))
  ts, _ = ckpt.restore(step, abstract)
  ckpt.close()
  return config, meta, model, param, ts


def export_run(workdir: str, out: str, float_codec: str = 'f32', mask_codec: str = 'auto',
               params_dir: str | None = None) -> dict:
  """Writes ``out`` (.pemn) and, if ``params_dir``, an orbax checkpoint of the
  materialized dense params + model state. Returns sizes."""
  config, meta, model, param, ts = load_run(workdir)
  arrays = {k: np.asarray(v) for k, v in jax.jit(param.export)(ts.state, ts.seed).items()}
  arrays.update({f'model_state/{k}': np.asarray(v) for k, v in flatten(ts.model_state).items()})
  header = {'format': 'pemn_jax model', 'pemn_jax_version': __version__,
            'jax_version': jax.__version__, 'model': config.model,
            'model_kwargs': config.model_kwargs.to_dict(), 'num_classes': meta['num_classes'],
            'input_shape': meta['input_shape'], 'param': config.param.to_dict(),
            'seed': int(ts.seed), 'dataset': config.dataset, 'step': int(meta['step'])}
  size = artifact.write(out, header, arrays, float_codec, mask_codec)
  result = {'file_bytes': size, 'num_params': param.num_params, 'header': header}
  if params_dir:
    params = jax.jit(param.materialize)(ts.state, ts.seed)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(params_dir), {'params': params, **ts.model_state}, force=True)
    ckptr.wait_until_finished()
    result['params_dir'] = params_dir
  return result


def load(path: str):
  """(header, model, params, model_state) from a ``.pemn`` file."""
  header, arrays = artifact.read(path)
  try:
    model, param = build(header['model'], header['model_kwargs'], header['num_classes'],
                         header['input_shape'], header['param'])
    state_arrays = {k: v for k, v in arrays.items() if not k.startswith('model_state/')}
    seed = jnp.uint32(header['seed'])
    params = jax.jit(param.from_export)({k: jnp.asarray(v) for k, v in state_arrays.items()},
                                        seed)
  except (KeyError, ValueError, TypeError) as e:
    raise artifact.ArtifactError(f'{path!r}: cannot rebuild the model: {e}') from e
  model_state = unflatten({k[12:]: jnp.asarray(v) for k, v in arrays.items()
                           if k.startswith('model_state/')})
  return header, model, params, model_state
