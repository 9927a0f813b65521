import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pemn_jax.train.pruning import gmp_sparsity, prune


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {'a': {'kernel': jax.random.normal(k[0], (20, 10))}, 'a_b': {'bias': jnp.ones((10,))},
          'b': {'kernel': jax.random.normal(k[1], (10, 5))}}


def run(tx, steps=5):
  p = params()
  st = tx.init(p)
  for i in range(steps):
    g = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.01 * (i + 1)), p)
    u, st = tx.update(g, st, p)
    p = optax.apply_updates(p, u)
  return p, st


@pytest.mark.parametrize('criterion', ['magnitude', 'random'])
def test_fixed_masks_prune_exactly_and_stay_pruned(criterion):
  p0 = params()
  p, st = run(prune(optax.sgd(0.1), 0.8, criterion))
  for name in ('a', 'b'):
    w = np.asarray(p[name]['kernel'])
    assert (w != 0).sum() == round(0.2 * w.size)
  np.testing.assert_array_equal(np.asarray(p['a_b']['bias']) != 0, True)  # not selected
  if criterion == 'magnitude':  # survivors are the largest at init
    w0, w = np.abs(np.asarray(p0['a']['kernel'])), np.asarray(p['a']['kernel'])
    assert w0[w != 0].min() >= w0[w == 0].max()


def test_gmp_reaches_the_final_sparsity_on_schedule():
  assert float(gmp_sparsity(0, 0.9, 0, 10)) == 0.0
  assert float(gmp_sparsity(10, 0.9, 0, 10)) == pytest.approx(0.9)
  p, _ = run(prune(optax.sgd(0.1), 0.9, 'gmp', begin=0, end=4, every=2), steps=6)
  w = np.asarray(p['a']['kernel'])
  assert (w != 0).sum() == round(0.1 * w.size)


def test_bad_criterion():
  with pytest.raises(ValueError, match='criterion'):
    prune(optax.sgd(0.1), 0.5, 'lottery')
