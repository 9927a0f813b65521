import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pemn_jax.train.pruning import erk_densities, gmp_sparsity, prune

PATHS = ['a/kernel', 'b/kernel']


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {'a': {'kernel': jax.random.normal(k[0], (20, 10))}, 'a_b': {'bias': jnp.ones((10,))},
          'b': {'kernel': 3 * jax.random.normal(k[1], (10, 5))}}


def grads(p, i):
  return jax.tree.map(lambda x: jnp.full_like(x, 0.01 * (i + 1)), p)


def run(tx, steps=5, record=False):
  p = params()
  st = tx.init(p)
  history = []
  for i in range(steps):
    u, st = tx.update(grads(p, i), st, p)
    history.append(p)
    p = optax.apply_updates(p, u)
  return (p, st, history) if record else (p, st)


def nonzero(p, name):
  return int((np.asarray(p[name]['kernel']) != 0).sum())


@pytest.mark.parametrize('criterion', ['magnitude_at_init', 'random'])
def test_masks_at_init_prune_exactly_and_stay_pruned(criterion):
  p0 = params()
  p, st = run(prune(optax.sgd(0.1), 0.8, criterion, PATHS))
  for name, n in (('a', 200), ('b', 50)):
    assert nonzero(p, name) == n - int(0.8 * n)
  np.testing.assert_array_equal(np.asarray(p['a_b']['bias']) != 0, True)  # not selected
  if criterion == 'magnitude_at_init':  # survivors are the largest at init
    w0, w = np.abs(np.asarray(p0['a']['kernel'])), np.asarray(p['a']['kernel'])
    assert w0[w != 0].min() >= w0[w == 0].max()


def test_magnitude_trains_dense_then_prunes_the_smallest_then_fine_tunes():
  p, _, hist = run(prune(optax.sgd(0.1), 0.7, 'magnitude', PATHS, begin=3), steps=6, record=True)
  assert nonzero(hist[3], 'a') == 200  # dense until the prune step
  assert nonzero(p, 'a') == 200 - int(0.7 * 200) and nonzero(p, 'b') == 50 - int(0.7 * 50)
  # Survivors: the largest |w| after the prune step's own update (plain SGD).
  for name in ('a', 'b'):
    at = np.asarray(hist[3][name]['kernel']) - 0.1 * 0.04
    w = np.asarray(p[name]['kernel'])
    assert np.abs(at)[w != 0].min() >= np.abs(at)[w == 0].max()
    # ... and they kept training after it (3 more SGD steps of 0.05, 0.06).
    np.testing.assert_allclose(w[w != 0], (at - 0.1 * (0.05 + 0.06))[w != 0], rtol=1e-5)


def test_global_allocation_uses_one_threshold_over_all_leaves():
  p, _ = run(prune(optax.sgd(0.0), 0.8, 'magnitude', PATHS, allocation='global', begin=0))
  w = np.concatenate([np.abs(np.asarray(p[n]['kernel'])).ravel() for n in ('a', 'b')])
  w0 = np.concatenate([np.abs(np.asarray(params()[n]['kernel'])).ravel() for n in ('a', 'b')])
  assert (w != 0).sum() == 250 - int(0.8 * 250)
  assert w0[w != 0].min() >= w0[w == 0].max()
  # b's weights are 3x larger: it keeps a larger share than a.
  assert nonzero(p, 'b') / 50 > nonzero(p, 'a') / 200


def test_erk_densities_by_hand():
  # (10, 10) and (100, 100) at 50%: raw density 20/100 and 200/10^4; eps * (20 + 200)
  # = 5050 gives the first 4.59 > 1, so it is dense and the second takes
  # (5050 - 100) / 10^4 = 0.495.
  np.testing.assert_allclose(erk_densities([(10, 10), (100, 100)], 0.5), [1.0, 0.495])
  d = erk_densities([(5, 5, 1, 6), (5, 5, 6, 16), (400, 120), (120, 84), (84, 10)], 0.9)
  sizes = [150, 2400, 48000, 10080, 840]
  assert sum(x * n for x, n in zip(d, sizes)) == pytest.approx(0.1 * sum(sizes))
  p, _ = run(prune(optax.sgd(0.0), 0.5, 'magnitude', PATHS, allocation='erk', begin=0))
  da, db = erk_densities([(20, 10), (10, 5)], 0.5)
  assert nonzero(p, 'a') == 200 - int((1 - da) * 200) and nonzero(p, 'b') == 50 - int((1 - db) * 50)


def test_gmp_follows_the_cubic_schedule_to_the_final_sparsity():
  assert float(gmp_sparsity(0, 0.9, 0, 10)) == 0.0
  assert float(gmp_sparsity(5, 0.9, 0, 10)) == pytest.approx(0.9 * (1 - 0.5 ** 3))
  assert float(gmp_sparsity(10, 0.9, 0, 10)) == pytest.approx(0.9)
  p, _, hist = run(prune(optax.sgd(0.1), 0.9, 'gmp', PATHS, begin=0, end=4, every=2), steps=6,
                   record=True)
  # The mask set at step 2 has sparsity 0.9 * (1 - 0.5^3) = 0.7875: 200 - 157 kept.
  assert nonzero(hist[3], 'a') == 200 - int(np.floor(np.float32(0.9) * np.float32(0.875) * 200))
  assert nonzero(p, 'a') == 200 - int(0.9 * 200)


def test_bad_arguments():
  with pytest.raises(ValueError, match='criterion'):
    prune(optax.sgd(0.1), 0.5, 'lottery', PATHS)
  with pytest.raises(ValueError, match='allocation'):
    prune(optax.sgd(0.1), 0.5, 'gmp', PATHS, allocation='layerwise')
  with pytest.raises(ValueError, match='sparsity'):
    prune(optax.sgd(0.1), 1.0, 'gmp', PATHS)
  with pytest.raises(ValueError, match='not leaves'):
    prune(optax.sgd(0.1), 0.5, 'gmp', ['c/kernel']).init(params())
