"""TPU and GPU by construction: every registered model x every method family,
train and eval steps lowered for ('tpu', 'cuda') from this CPU host, hold no
CPU-only custom call, no N-sized scatter and no N-sized sort; mixed
precision takes bfloat16 operands there."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from pemn_jax import lowering, models
from pemn_jax import params as param_lib
from pemn_jax.train.optim import with_pruning
from pemn_jax.train.step import create_train_state, eval_batch, make_train_step

SHAPES = {'mlp': (28, 28, 1), 'lenet5': (28, 28, 1), 'lenet5_nnx': (28, 28, 1)}
# The ImageNet ResNets: the methods of their full-scale configs (parameterizations
# see only a params dict: every method meets basic blocks in resnet18; the
# stem's max pool and the bottleneck are what is new here).
ONLY = {'resnet18_imagenet': ('ring',), 'resnet34': ('ring',), 'resnet50': ('edge_popup',)}
METHODS = {
    'dense': {'name': 'dense'},
    'ring': {'name': 'ring', 'dof': 0.01},
    'prototype_ol': {'name': 'prototype', 'mode': 'ol'},
    'prototype_mp': {'name': 'prototype', 'mode': 'mp'},
    'prototype_rp': {'name': 'prototype', 'mode': 'rp', 'permute': True},
    'edge_popup': {'name': 'masked', 'keep': 0.5,
                   'source': {'name': 'prototype', 'mode': 'signed_constant', 'rest': 'fixed'}},
    'supermask': {'name': 'masked', 'kind': 'supermask', 'eval': 'expected', 'eval_samples': 2},
    'gated': {'name': 'gated', 'sparsity': 0.5},
    'pruning_gmp': {'name': 'dense'},
}
GMP = ml_collections.ConfigDict({'criterion': 'gmp', 'sparsity': 0.9, 'allocation': 'global',
                                 'skip_first': False, 'begin_fraction': 0.0,
                                 'end_fraction': 0.5, 'every': 1})


_VARIABLES = {}


def _variables(model, shape):
  """The model's variable shapes, traced once per model (tracing is this file's cost)."""
  key = (repr(model), shape)
  if key not in _VARIABLES:
    _VARIABLES[key] = models.abstract_variables(model, shape)
  return _VARIABLES[key]


def lowered_steps(name, method, dtype=None, platforms=('tpu', 'cuda'), batch=2):
  """(lowered program of a train step + an evaluation batch, parameterization)."""
  shape = SHAPES.get(name, (32, 32, 3))
  model = models.get(name, **({'gates': True} if method == 'gated' else {}))
  variables = _variables(model, shape)
  param = param_lib.build(METHODS[method], variables['params'], model=model, total_steps=10)
  tx = optax.sgd(0.1, momentum=0.9)
  if method.startswith('pruning'):
    tx = with_pruning(tx, GMP, 10, 0, param)
  model_state = {c: v for c, v in variables.items() if c != 'params'}
  ts = jax.eval_shape(lambda k: create_train_state(param, tx, k, None, 0),
                      jax.random.key(0)).replace(model_state=model_state)

  def train_and_eval(ts, images, labels, weights, rng):
    new, metrics = make_train_step(model, param, tx, dtype=dtype)(ts, images, labels, rng)
    sums = eval_batch(model, lambda r: param.materialize(ts.state, ts.seed, r), ts.model_state,
                      images, labels, weights, param.eval_rngs(ts.seed), dtype)
    return new, metrics, sums

  args = (ts, jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.eval_shape(lambda: jax.random.key(0)))
  return lowering.lower(train_and_eval, args, platforms), param


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_every_method_lowers_clean_for_tpu_and_cuda(name):
  failures = []
  for method in ONLY.get(name, METHODS):
    if method == 'gated' and name.endswith('_nnx'):
      continue  # the NNX twins have no gated variant
    lowered, param = lowered_steps(name, method)
    found = lowering.problems(lowering.census(lowered), getattr(param, 'dof', 0))
    failures += [f'{name} x {method}: {p}' for p in found]
  assert not failures, failures


def test_the_census_sees_what_it_forbids():
  # A T-sized scatter-add (today's transposed gather), a large sort, and the
  # oneDNN custom calls of a CPU program: each is named.
  t, d = 200_000, 1000
  idx = jax.ShapeDtypeStruct((t,), jnp.int32)
  scatter = lowering.lower(lambda i, v: jnp.zeros(d).at[i].add(v), (idx, jax.ShapeDtypeStruct(
      (t,), jnp.float32)), ('tpu',))
  assert lowering.problems(lowering.census(scatter), d) == [f'scatter of {t} updates (> 65536)']
  sort = lowering.lower(jnp.sort, (jax.ShapeDtypeStruct((t,), jnp.float32),), ('cuda',))
  assert lowering.problems(lowering.census(sort)) == [f'sort of {t} elements']
  from pemn_jax.kernels import dnnl_conv
  if dnnl_conv.available():
    cpu, _ = lowered_steps('lenet5', 'dense', platforms=('cpu',))
    assert any('PemnDnnl' in p for p in lowering.problems(lowering.census(cpu)))


def test_bfloat16_steps_take_bfloat16_operands_on_tpu():
  for name in ('resnet8', 'vit', 'mlp', 'resnet20_nnx'):
    lowered, _ = lowered_steps(name, 'ring', dtype='bfloat16', platforms=('tpu',))
    matmuls = lowering.census(lowered)['matmuls']
    assert matmuls
    wrong = [m for m in matmuls if set(m[1]) != {'bf16'}]
    assert not wrong, (name, wrong[:5])
    f32, _ = lowered_steps(name, 'ring', platforms=('tpu',))
    assert {t for _, ts in lowering.census(f32)['matmuls'] for t in ts} == {'f32'}


def test_a_runs_steps_export_for_accelerators_and_reload_on_cpu(mnist_slice):
  # jax.export of the trainer's own steps: for TPU and CUDA from this host,
  # and for CPU with XLA's kernels, whose serialized artifact reloads and
  # gives the direct call's loss.
  import numpy as np
  from conftest import tiny_config

  from pemn_jax.kernels import conv
  from pemn_jax.train.loop import step_functions
  from pemn_jax.train.run import Run
  c = tiny_config(mnist_slice, model='lenet5', param={'name': 'ring', 'dof': 0.05}, batch_size=16)
  c.model_kwargs = {}
  run = Run.build(c)
  ts = jax.jit(lambda k: run.init_state(k, np.uint32(0)))(jax.random.key(0))
  train, evaluate = step_functions(run)
  images, labels, weights = next(run.test_pipe.eval_batches())
  cases = {'train': (train, (ts, {}, *run.pipe.raw_batch(0), np.uint32(0))),
           'eval': (evaluate, (ts, {}, images, labels, weights))}
  for what, (fn, args) in cases.items():
    accel, _ = lowering.export(fn, args, ('tpu', 'cuda'))
    assert accel.platforms == ('tpu', 'cuda') and len(accel.serialize()) > 1000, what
    with conv.forced('xla'):  # the CPU program with XLA's kernels (no custom call)
      exported, tree = lowering.export(fn, args, ('cpu',))
      direct = jax.jit(fn)(*args)
    reloaded = lowering.call(jax.export.deserialize(exported.serialize()), tree, args)
    want, got = (direct[1]['loss'], reloaded[1]['loss']) if what == 'train' else (
        direct[2], reloaded[2])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, err_msg=what)
