import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_target, tree_equal

from pemn_jax.params import Ring, flatten
from pemn_jax.params.base import fan_in

SHAPES = {'a/kernel': (5, 3), 'b/kernel': (2, 2, 3, 4), 'b/bias': (4,), 'c/kernel': (4, 2)}


def explicit_matrix(ring: Ring, seed):
  """The dense (N_generated x D) matrix A with generated = A @ ring."""
  rows = []
  for p in ring.generated:
    pos, sign = (np.asarray(x) for x in ring.indices(p, seed))
    a = np.zeros((pos.size, ring.dof), np.float64)
    a[np.arange(pos.size), pos] = sign * ring.scale(p)
    rows.append(a)
  return np.concatenate(rows)


def test_ring_matches_explicit_formulation_and_its_gradient():
  ring = Ring(tiny_target(SHAPES), dof=7)
  state = ring.init(jax.random.key(0))
  a = explicit_matrix(ring, 42)
  params = flatten(ring.materialize(state, 42))
  gen = np.concatenate([np.asarray(params[p]).reshape(-1) for p in ring.generated])
  np.testing.assert_allclose(gen, a @ np.asarray(state['ring']), rtol=1e-6, atol=1e-7)

  c = jax.random.normal(jax.random.key(1), (a.shape[0],))
  def loss(s):
    f = flatten(ring.materialize(s, 42))
    return jnp.sum(c * jnp.concatenate([f[p].reshape(-1) for p in ring.generated]))
  g = jax.grad(loss)(state)
  np.testing.assert_allclose(np.asarray(g['ring']), a.T @ np.asarray(c), rtol=1e-5, atol=1e-6)


def test_each_leaf_reads_consecutive_ring_positions_in_random_order():
  ring = Ring(tiny_target(SHAPES), dof=7)
  offset = 0
  for p in ring.generated:
    pos, sign = (np.asarray(x) for x in ring.indices(p, 3))
    n = pos.size
    expected = (offset + np.arange(n)) % 7
    np.testing.assert_array_equal(np.sort(pos), np.sort(expected))
    assert set(np.unique(sign)) <= {-1.0, 1.0}
    offset += n
  big = Ring(tiny_target({'w/kernel': (64, 64)}), dof=4096)
  pos, sign = (np.asarray(x) for x in big.indices('w/kernel', 3))
  assert (pos != np.arange(4096)).mean() > 0.9  # shuffled, not in order
  assert abs(sign.mean()) < 0.1


def test_even_sampling_of_the_ring():
  ring = Ring(tiny_target(SHAPES), dof=13)
  counts = np.zeros(13, int)
  for p in ring.generated:
    np.add.at(counts, np.asarray(ring.indices(p, 5)[0]), 1)
  t = ring.num_generated
  assert counts.sum() == t
  assert set(counts) <= {t // 13, -(-t // 13)}


def test_state_is_only_the_ring_and_rest():
  target = tiny_target(SHAPES)
  ring = Ring(target, dof=7)
  state = ring.init(jax.random.key(0))
  leaves = jax.tree.leaves(state)
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in leaves)
  assert sum(x.size for x in leaves) == 7 + 4  # ring + b/bias
  fixed = Ring(target, dof=7, rest='fixed')
  fstate = fixed.init(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(fstate)) == 7
  np.testing.assert_array_equal(np.asarray(fixed.materialize(fstate, 0)['b']['bias']), 0)


def test_same_seed_bit_identical_different_seed_differs():
  ring = Ring(tiny_target(SHAPES), dof=7)
  state = ring.init(jax.random.key(0))
  p1 = ring.materialize(state, 1)
  assert tree_equal(p1, ring.materialize(state, 1))
  assert tree_equal(p1, jax.jit(ring.materialize)(state, jnp.uint32(1)))
  p2 = ring.materialize(state, 2)
  assert not np.array_equal(np.asarray(p1['b']['kernel']), np.asarray(p2['b']['kernel']))


def test_initial_variance_is_he_fan_in():
  target = tiny_target({'big/kernel': (3, 3, 64, 128), 'fc/kernel': (512, 100)})
  ring = Ring(target, dof=5000)
  params = flatten(ring.materialize(ring.init(jax.random.key(0)), 0))
  for p, shape in [('big/kernel', (3, 3, 64, 128)), ('fc/kernel', (512, 100))]:
    assert np.std(np.asarray(params[p])) == pytest.approx(np.sqrt(2 / fan_in(shape)), rel=0.05)


def test_dof_fraction_and_errors():
  target = tiny_target(SHAPES)
  n = sum(int(np.prod(s)) for s in SHAPES.values())
  assert Ring(target, dof=0.1).dof == round(0.1 * n)
  with pytest.raises(ValueError, match='dof'):
    Ring(target, dof=0)
  with pytest.raises(ValueError, match='integer'):
    Ring(target, dof=2.5)
  with pytest.raises(ValueError, match='matches no leaf'):
    Ring(target, dof=3, select='nothing_here')
  with pytest.raises(ValueError, match='rest'):
    Ring(target, dof=3, rest='frozen')
