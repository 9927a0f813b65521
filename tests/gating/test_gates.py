"""Polarization gating: straight-through gates, the regularizer reaching its
target, composition with generated weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pemn_jax import models
from pemn_jax import params as param_lib
from pemn_jax.pytrees import flatten, unflatten


def gated(model_name='mlp', spec=None, **model_kwargs):
  kw = {'hidden': (24, 12)} if model_name == 'mlp' else {}
  kw.update(model_kwargs)
  model = models.get(model_name, gates=True, **kw)
  shape = (28, 28, 1) if model_name in ('mlp', 'lenet5') else (32, 32, 3)
  target = models.abstract_params(model, shape)
  return model, param_lib.build(spec or {'name': 'gated', 'sparsity': 0.5}, target, model=model,
                        total_steps=100), shape


def test_forward_uses_exact_0_1_gates_and_gradients_reach_every_gate():
  model, param, shape = gated()
  state = param.init(jax.random.key(0))
  g = flatten(state['gates'])
  g['Gate_0/gate'] = g['Gate_0/gate'].at[:10].set(0.2)  # closed
  state = {**state, 'gates': unflatten(g)}
  params = param.materialize(state, 0)
  gate0 = np.asarray(params['Gate_0']['gate'])
  np.testing.assert_array_equal(gate0, [0.0] * 10 + [1.0] * 14)
  x = jax.random.normal(jax.random.key(1), (8, *shape))

  def loss(st):
    return jnp.sum(model.apply({'params': param.materialize(st, 0)}, x) ** 2)
  grads = flatten(jax.grad(loss)(state)['gates'])
  # Straight-through: closed gates get a gradient too (they can reopen).
  assert np.all(np.asarray(grads['Gate_0/gate'])[:10] != 0)
  assert np.any(np.asarray(grads['Gate_1/gate']) != 0)


@pytest.mark.parametrize('target', [0.3, 0.5, 0.7])
def test_the_regularizer_alone_drives_the_gates_to_the_target_sparsity(target):
  model, param, _ = gated(spec={'name': 'gated', 'sparsity': target, 'warmup': 0.0, 'ramp': 0.01,
                                'polarize': 10.0})
  state = param.init(jax.random.key(0))
  g = flatten(state['gates'])  # distinct starting values, as training would leave them
  rng = np.random.default_rng(0)
  state = {**state, 'gates': unflatten({k: jnp.asarray(rng.uniform(0.6, 1.0, v.shape))
                                        for k, v in g.items()})}
  tx = optax.adam(0.01)
  opt = tx.init(state)

  @jax.jit
  def step(state, opt, i):
    grads = jax.grad(lambda s: param.regularizer(s, 0, i))(state)
    upd, opt = tx.update(grads, opt)
    return param.project(optax.apply_updates(state, upd)), opt
  for i in range(600):
    state, opt = step(state, opt, jnp.int32(i + 100))
  hard = {k: (v > 0.5).astype(jnp.float32) for k, v in param.soft(state).items()}
  assert abs(float(param.sparsity_of(hard)) - target) < 0.03
  soft = np.concatenate([np.asarray(v).ravel() for v in param.soft(state).values()])
  assert np.mean((soft < 0.1) | (soft > 0.9)) > 0.9  # polarized


def test_sparsity_counts_the_next_layers_weights_by_hand():
  model, param, _ = gated()
  n = 784 * 24 + 24 * 12 + 12 * 10  # kernel weights
  gates = {'Gate_0/gate': jnp.asarray([1.0] * 18 + [0.0] * 6), 'Gate_1/gate': jnp.ones(12)}
  # 6 closed hidden units remove their 784 inputs and their 12 outputs.
  assert float(param.sparsity_of(gates)) == pytest.approx(6 * (784 + 12) / n, rel=1e-6)
  gates['Gate_1/gate'] = jnp.asarray([1.0] * 8 + [0.0] * 4)
  kept = 784 * 18 + 18 * 8 + 8 * 10
  assert float(param.sparsity_of(gates)) == pytest.approx(1 - kept / n, rel=1e-6)


def test_the_ramp_and_the_metrics():
  _, param, _ = gated(spec={'name': 'gated', 'warmup': 0.1, 'ramp': 0.2, 'strength': 2.0})
  assert [float(param.lam(s)) for s in (0, 10, 20, 30, 99)] == [0.0, 0.0, 1.0, 2.0, 2.0]
  m = param.metrics(param.init(jax.random.key(0)), 0, 50)
  assert float(m['gate_sparsity']) == 0.0 and float(m['gate_lambda']) == 2.0
  assert float(m['gate_near_common']) == 1.0  # all open at 1


@pytest.mark.parametrize('source', [
    {'name': 'ring', 'dof': 500},
    {'name': 'masked', 'keep': 0.5, 'source': {'name': 'prototype', 'mode': 'rp',
                                                'ratio': 0.01}},
])
def test_gates_compose_with_generated_weights(source):
  model, param, shape = gated(spec={'name': 'gated', 'source': source})
  assert 'Gate_0/gate' not in flatten(param.source.target)  # the source never sees gates
  state = param.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, *shape))
  grads = jax.grad(lambda s: param.regularizer(s, 0, 50) + jnp.sum(
      model.apply({'params': param.materialize(s, 0)}, x) ** 2))(state)
  assert any(np.abs(np.asarray(v)).sum() > 0 for v in jax.tree.leaves(grads['source']))
  assert np.abs(np.asarray(grads['gates']['Gate_0']['gate'])).sum() > 0


def test_gated_needs_a_gated_model():
  model = models.get('mlp', hidden=(8,))
  target = models.abstract_params(model, (28, 28, 1))
  with pytest.raises(ValueError, match='gates=True'):
    param_lib.build({'name': 'gated'}, target, model=model)
  with pytest.raises(ValueError, match='sparsity'):
    gated(spec={'name': 'gated', 'sparsity': 1.5})


def test_traced_target_sparsity_gives_that_targets_regularizer():
  model, param, _ = gated()
  _, other, _ = gated(spec={'name': 'gated', 'sparsity': 0.3})
  state = param.init(jax.random.key(0))
  g = flatten(state['gates'])
  g['Gate_0/gate'] = g['Gate_0/gate'].at[:10].set(0.3)
  state = {**state, 'gates': unflatten(g)}
  traced = jax.jit(lambda h: param.with_hyperparams(h).regularizer(state, 0, 100))
  want = float(jax.jit(lambda: other.regularizer(state, 0, 100))())
  assert float(traced(other.hyperparams())) == pytest.approx(want, rel=1e-6)
  assert float(traced(param.hyperparams())) != pytest.approx(want, rel=1e-3)


def test_the_logged_loss_is_the_task_loss_and_the_regularizer_is_logged_apart():
  from pemn_jax.train.step import TrainState, make_train_step
  model, param, shape = gated(spec={'name': 'gated', 'warmup': 0.0, 'ramp': 0.01,
                                    'strength': 5.0})
  state = param.init(jax.random.key(0))
  tx = optax.sgd(0.1)
  ts = TrainState(step=jnp.int32(50), state=state, opt_state=tx.init(state), model_state={},
                  seed=jnp.uint32(0))
  images = jax.random.normal(jax.random.key(1), (8, *shape))
  labels = jnp.arange(8) % 10
  _, m = jax.jit(make_train_step(model, param, tx))(ts, images, labels)
  # Built apart: the model's cross-entropy on the materialized params.
  logits = model.apply({'params': param.materialize(state, 0)}, images)
  ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
  assert float(m['loss']) == pytest.approx(ce, rel=1e-5)
  reg = float(param.regularizer(state, 0, 50))
  assert reg > 1.0 and float(m['regularizer']) == pytest.approx(reg, rel=1e-5)
  dense = param_lib.build({'name': 'dense'}, models.abstract_params(model, shape))
  assert not dense.has_regularizer and param.has_regularizer


def test_a_missed_target_sparsity_is_reported_and_slicing_warns(mnist_slice, tmp_path):
  """Gates that never close (the ramp starts after the run): training says the
  sparsity was NOT met, and export --slice says it removed nothing."""
  import subprocess
  import sys

  from conftest import REPO, tiny_config

  from pemn_jax.train.loop import train_and_evaluate
  spec = {'name': 'gated', 'sparsity': 0.7, 'warmup': 0.99, 'source': {'name': 'dense'}}
  c = tiny_config(mnist_slice, param=spec, num_steps=6, **{'model_kwargs.gates': True})
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  [goal] = out['goals']
  assert goal['what'] == 'gate sparsity' and goal['asked'] == pytest.approx(0.7)
  assert goal['reached'] == 0.0 and not goal['met']
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={tmp_path / "run"}',
                      f'--out={tmp_path / "s.pemn"}', '--slice'], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  assert 'no width changed' in p.stdout and 'slicing removed nothing' in p.stdout, p.stdout
