import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_target, tree_equal

from pemn_jax import params as param_lib
from pemn_jax.params import Masked, Prototype, Ring
from pemn_jax.pytrees import flatten

SHAPES = {'a/kernel': (3, 3, 2, 5), 'a/bias': (5,), 'n/scale': (5,), 'fc/kernel': (7, 3)}


@pytest.mark.parametrize('keep', [0.05, 0.3, 0.5, 0.9])
def test_masks_keep_what_the_reference_keeps(keep):
  m = Masked(Prototype(tiny_target(SHAPES), mode='dense'), keep=keep)
  state = m.init(jax.random.key(0))
  scores = flatten(state['scores'])
  for p, mask in m.masks(state).items():
    # hidden-networks' GetSubnet on |scores|: zero the int((1 - k) n) smallest.
    a = np.abs(np.asarray(scores[p])).reshape(-1)
    expected = np.ones(a.size)
    expected[np.argsort(a, kind='stable')[:int((1 - keep) * a.size)]] = 0
    np.testing.assert_array_equal(np.asarray(mask).reshape(-1), expected, err_msg=p)
  # The materialized weights are the source's times the mask.
  src = flatten(m.source.materialize(state['source'], 0))
  out = flatten(m.materialize(state, 0))
  masks = m.masks(state)
  for p in m.masked:
    np.testing.assert_array_equal(np.asarray(out[p]), np.asarray(src[p] * masks[p]))
  np.testing.assert_array_equal(np.asarray(out['a/bias']), 0)


def test_ste_gradient_by_hand_on_a_small_layer():
  target = tiny_target({'l/kernel': (2, 3)})
  m = Masked(Prototype(target, mode='dense'), keep=0.5)
  state = m.init(jax.random.key(3))
  w = np.asarray(m.source.materialize(state['source'], 0)['l']['kernel'])
  s = np.asarray(state['scores']['l']['kernel'])
  c = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
  loss = lambda st: jnp.sum(c * m.materialize(st, 0)['l']['kernel'])
  g = np.asarray(jax.grad(loss)(state)['scores']['l']['kernel'])
  # Straight-through: dL/dscore = dL/dw_eff * w * sign(score), for kept and dropped alike.
  np.testing.assert_allclose(g, c * w * np.sign(s), rtol=1e-6)
  # Forward: the 3 largest |score| are kept.
  kept = np.asarray(m.materialize(state, 0)['l']['kernel']) != 0
  assert kept.sum() == 3 and np.abs(s)[kept].min() > np.abs(s)[~kept].max()


def test_edge_popup_with_fixed_rest_trains_only_scores():
  m = Masked(Prototype(tiny_target(SHAPES), mode='dense', rest='fixed'), keep=0.5)
  state = m.init(jax.random.key(0))
  n_scores = 3 * 3 * 2 * 5 + 7 * 3
  assert sum(x.size for x in jax.tree.leaves(state)) == n_scores
  out = flatten(m.materialize(state, 0))
  np.testing.assert_array_equal(np.asarray(out['n/scale']), 1.0)
  assert m.storage_bits() == {'prototype_floats': 32 * n_scores, 'mask_bits': n_scores}


def test_masked_ring_gradients_reach_ring_and_scores():
  m = Masked(Ring(tiny_target(SHAPES), dof=11), keep=0.5)
  state = m.init(jax.random.key(0))
  g = jax.grad(lambda s: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(m.materialize(s, 0))))(state)
  assert np.abs(np.asarray(g['source']['ring'])).sum() > 0
  assert np.abs(np.asarray(g['scores']['a']['kernel'])).sum() > 0


def test_supermask_threshold_eval_and_training_samples():
  m = Masked(Prototype(tiny_target(SHAPES), mode='dense'), kind='supermask', eval='threshold')
  state = m.init(jax.random.key(0))
  det = m.masks(state)
  s = np.asarray(state['scores']['fc']['kernel'])
  np.testing.assert_array_equal(np.asarray(det['fc/kernel']), (s > 0).astype(np.float32))
  a = m.masks(state, jax.random.key(1))
  b = m.masks(state, jax.random.key(2))
  assert tree_equal(a, m.masks(state, jax.random.key(1)))
  assert not tree_equal(a, b)
  # Straight-through to sigmoid(score).
  g = jax.grad(lambda st: jnp.sum(m.masks(st, jax.random.key(1))['fc/kernel']))(state)
  sig = 1 / (1 + np.exp(-s))
  np.testing.assert_allclose(np.asarray(g['scores']['fc']['kernel']), sig * (1 - sig), rtol=1e-5)


def test_build_and_errors():
  target = tiny_target(SHAPES)
  m = param_lib.build({'name': 'masked', 'keep': 0.3,
               'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 0.1}}, target)
  assert isinstance(m, Masked) and m.source.mode == 'rp'
  with pytest.raises(ValueError, match='unknown parameterization'):
    param_lib.build({'name': 'nope'}, target)
  with pytest.raises(ValueError, match="bad options for parameterization 'ring'"):
    param_lib.build({'name': 'ring', 'dof': 3, 'colour': 1}, target)
  with pytest.raises(ValueError, match='keep'):
    Masked(Prototype(target, mode='dense'), keep=1.5)
  with pytest.raises(ValueError, match='kind'):
    Masked(Prototype(target, mode='dense'), kind='magic')
  with pytest.raises(TypeError, match='target'):
    param_lib.Dense({})


def test_supermask_sampled_eval_is_deterministic_given_its_key():
  target = tiny_target({'big/kernel': (64, 64)})
  m = Masked(Prototype(target, mode='dense'), kind='supermask')  # eval='sample' (reference)
  state = m.init(jax.random.key(0))
  e1 = np.asarray(m.materialize(state, 7)['big']['kernel'])
  assert np.array_equal(e1, np.asarray(m.materialize(state, 7)['big']['kernel']))
  jitted = np.asarray(jax.jit(m.materialize)(state, jnp.uint32(7))['big']['kernel'])
  np.testing.assert_array_equal(jitted != 0, e1 != 0)  # same mask (values may differ by an ulp)
  # A sample, not the threshold: with p ~ 0.5 everywhere, ~half differ.
  w = np.asarray(m.source.materialize(state['source'], 7)['big']['kernel'])
  thr = w * (np.asarray(state['scores']['big']['kernel']) > 0)
  assert 0.3 < np.mean(e1 != thr) < 0.7
  # Another eval key (eval_seed) draws another mask; the model file stores this one.
  other = Masked(Prototype(target, mode='dense'), kind='supermask', eval_seed=1)
  assert not np.array_equal(e1, np.asarray(other.materialize(state, 7)['big']['kernel']))
  exported = m.export(state, 7)['mask/big/kernel']
  np.testing.assert_array_equal(np.asarray(exported), e1 != 0)
  assert m.eval_rngs(7) is None


def test_supermask_expected_eval_averages_k_sampled_networks():
  m = Masked(Prototype(tiny_target(SHAPES), mode='dense'), kind='supermask', eval='expected',
             eval_samples=5)
  keys = m.eval_rngs(3)
  assert keys.shape == (5,)
  state = m.init(jax.random.key(0))
  masks = [np.asarray(m.masks(state, k)['fc/kernel']) for k in keys]
  assert len({x.tobytes() for x in masks}) == 5  # five different networks
  assert np.array_equal(np.asarray(jax.random.key_data(keys)),
                        np.asarray(jax.random.key_data(m.eval_rngs(3))))
  with pytest.raises(ValueError, match='eval'):
    Masked(Prototype(tiny_target(SHAPES), mode='dense'), kind='supermask', eval='mean')


def test_traced_keep_gives_the_masks_of_that_keep():
  # A sweep traces keep as per-leaf counts; they must give exactly the masks
  # a parameterization built with that keep gives (counted independently).
  target = tiny_target(SHAPES)
  base = Masked(Prototype(target, mode='dense'), keep=0.5)
  state = base.init(jax.random.key(2))
  run = jax.jit(lambda h: base.with_hyperparams(h).masks(state))
  for keep in (0.05, 0.3, 0.9, 1.0):
    other = Masked(Prototype(target, mode='dense'), keep=keep)
    traced = run(other.hyperparams())
    for p, mask in other.masks(state).items():
      np.testing.assert_array_equal(np.asarray(traced[p]), np.asarray(mask), err_msg=(keep, p))
      n = mask.size
      assert int(np.asarray(traced[p]).sum()) == max(1, n - int((1 - keep) * n))
  assert base.hyperparams()['kept'].keys() == set(base.masked)
  # Supermasks have no top-k count to trace.
  assert Masked(Prototype(target, mode='dense'), kind='supermask').hyperparams() == {}
