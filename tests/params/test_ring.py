import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_target, tree_equal

from pemn_jax import models
from pemn_jax.params import Ring
from pemn_jax.pytrees import flatten

SHAPES = {'a/kernel': (5, 3), 'b/kernel': (2, 2, 3, 4), 'b/bias': (4,), 'c/kernel': (4, 2)}
RING_STD = math.sqrt(2 / 4608)

# --- An independent numpy formulation of the documented ring (no pemn_jax call) ---
M32 = 0xFFFFFFFF


def _lowbias32(x):
  x = np.asarray(x, np.uint64) & M32
  x ^= x >> 16
  x = (x * 0x7FEB352D) & M32
  x ^= x >> 15
  x = (x * 0x846CA68B) & M32
  x ^= x >> 16
  return x


def _mix(*words):
  h = np.uint64(0x9E3779B9)
  for w in words:
    h = _lowbias32(h ^ ((np.asarray(w, np.uint64) + 0x6A09E667) & M32))
  return h


def _crc(path):
  return zlib.crc32(path.encode()) & M32


def _permutation(n, seed, leaf):
  """The keyed 6-round unbalanced Feistel network on [0, 2^m) with cycle walking."""
  m = max(1, math.ceil(math.log2(n))) if n > 1 else 1
  wl, wr = m // 2, m - m // 2
  keys = [int(_mix(seed, _crc(leaf), 0xFE15, r)) for r in range(6)]

  def feistel(x):
    a, b = wl, wr
    left, right = x >> b, x & ((1 << b) - 1)
    for k in keys:
      f = int(_lowbias32((right * 0x9E3779B1 + k) & M32))
      left, right = right, (left ^ f) & ((1 << a) - 1)
      a, b = b, a
    return (left << b) | right

  out = []
  for j in range(n):
    x = feistel(j)
    while x >= n:
      x = feistel(x)
    out.append(x)
  return np.array(out)


def oracle_matrix(shapes_in_order, dof, seed, fans):
  """A (T x D) with generated = A @ ring, from the spec: global permutation of
  the index multiset cut into leaves, per-element hash signs, per-leaf
  constants sqrt(2 / fan) / ring_std."""
  sizes = [math.prod(s) for _, s in shapes_in_order]
  t = sum(sizes)
  u = _permutation(t, seed, 'ring/global')
  full = dof * (t // dof)
  extra = _permutation(dof, seed, 'ring/extra') if full < t else None
  idx = np.where(u < full, u % dof, extra[np.clip(u - full, 0, dof - 1)] if extra is not None
                 else 0)
  a = np.zeros((t, dof))
  start = 0
  for (path, _), n, fan in zip(shapes_in_order, sizes, fans):
    local = np.arange(n)
    sign = 1.0 - 2.0 * (_mix(seed, _crc(path), 0x5167, local) >> 31).astype(np.float64)
    a[start + local, idx[start:start + n]] = sign * math.sqrt(2 / fan) / RING_STD
    start += n
  return a


def test_ring_equals_the_independent_formulation_and_so_does_its_gradient():
  target = tiny_target(SHAPES)
  ring = Ring(target, dof=7)
  # Generated leaves: the kernels, sorted; fan-out = out * receptive field.
  order = [('a/kernel', (5, 3)), ('b/kernel', (2, 2, 3, 4)), ('c/kernel', (4, 2))]
  a = oracle_matrix(order, 7, 42, fans=[3, 2 * 2 * 4, 2])
  state = ring.init(jax.random.key(0))
  params = flatten(ring.materialize(state, 42))
  gen = np.concatenate([np.asarray(params[p]).reshape(-1) for p, _ in order])
  np.testing.assert_allclose(gen, a @ np.asarray(state['ring']), rtol=1e-5, atol=1e-7)

  c = np.random.default_rng(1).normal(size=a.shape[0])

  def loss(s):
    f = flatten(ring.materialize(s, 42))
    return jnp.sum(jnp.asarray(c, jnp.float32) * jnp.concatenate(
        [f[p].reshape(-1) for p, _ in order]))
  g = jax.grad(loss)(state)
  np.testing.assert_allclose(np.asarray(g['ring']), a.T @ c, rtol=1e-4, atol=1e-4)
  # The rest is ordinary trained params.
  np.testing.assert_array_equal(np.asarray(g['rest']['b']['bias']), 0)


def test_reference_preset_generates_stage_convs_not_stem_nor_classifier():
  model = models.get('resnet20')
  ring = Ring(models.abstract_params(model, (32, 32, 3)), dof=0.01, select='@stages')
  # ResNet-20: stem conv, 3 stages x 3 blocks x 2 convs, 2 projection shortcuts, classifier.
  blocks = [f'BasicBlock_{i}' for i in range(9)]
  expected = {f'{b}/Conv_{j}/kernel' for b in blocks for j in (0, 1)}
  expected |= {'BasicBlock_3/Conv_2/kernel', 'BasicBlock_6/Conv_2/kernel'}
  assert set(ring.generated) == expected
  assert 'Conv_0/kernel' in ring.others and 'Dense_0/kernel' in ring.others
  # Every kernel is generated with '@kernels'.
  every = Ring(models.abstract_params(model, (32, 32, 3)), dof=0.01, select='@kernels')
  assert set(every.generated) == expected | {'Conv_0/kernel', 'Dense_0/kernel'}


def leaf_indices(ring, path, seed):
  """Ring positions and signs of one leaf's elements (flat order)."""
  pos, sign, _ = ring.flat_indices(seed)
  i = ring.generated.index(path)
  s, n = int(ring.segments.starts[i]), int(ring.segments.sizes[i])
  return pos[s:s + n], sign[s:s + n]


def test_window_assignment_reads_consecutive_ring_positions_in_random_order():
  ring = Ring(tiny_target(SHAPES), dof=7, assign='window')
  offset = 0
  for p in ring.generated:
    pos, sign = (np.asarray(x) for x in leaf_indices(ring, p, 3))
    n = pos.size
    expected = (offset + np.arange(n)) % 7
    np.testing.assert_array_equal(np.sort(pos), np.sort(expected))
    assert set(np.unique(sign)) <= {-1.0, 1.0}
    offset += n
  big = Ring(tiny_target({'w/kernel': (64, 64)}), dof=4096, assign='window')
  pos, sign = (np.asarray(x) for x in leaf_indices(big, 'w/kernel', 3))
  assert (pos != np.arange(4096)).mean() > 0.9  # shuffled, not in order
  assert abs(sign.mean()) < 0.1


def test_global_assignment_spreads_each_leaf_over_the_whole_ring():
  target = tiny_target({'a/kernel': (40, 50), 'b/kernel': (30, 50)})
  ring = Ring(target, dof=1000)  # T = 3500: 3 full copies + 500 extra positions
  pos, _ = (np.asarray(x) for x in leaf_indices(ring, 'b/kernel', 0))
  # A window would cover 1500 positions mod 1000 (all of them, 500 twice); a
  # random cut of the multiset covers ~ 1000 * (1 - P(a position is missed)).
  assert 700 < len(np.unique(pos)) < 1000
  counts = np.bincount(np.asarray(ring.flat_indices(0)[0]), minlength=1000)
  assert set(counts) == {3, 4} and (counts == 4).sum() == 500


@pytest.mark.parametrize('assign', ['global', 'window'])
@pytest.mark.parametrize('dof', [1, 5, 13, 46])
def test_even_sampling_of_the_ring(assign, dof):
  ring = Ring(tiny_target(SHAPES), dof=dof, assign=assign)
  counts = np.bincount(np.asarray(ring.flat_indices(5)[0]), minlength=dof)
  t = ring.num_generated
  assert counts.sum() == t and len(counts) == dof
  assert set(counts) <= {t // dof, -(-t // dof)}


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


def test_initial_variance_is_he_fan_out_from_a_small_ring():
  target = tiny_target({'big/kernel': (3, 3, 64, 128), 'fc/kernel': (512, 100)})
  ring = Ring(target, dof=5000)
  state = ring.init(jax.random.key(0))
  assert np.std(np.asarray(state['ring'])) == pytest.approx(RING_STD, rel=0.05)
  params = flatten(ring.materialize(state, 0))
  for p, fan in [('big/kernel', 9 * 128), ('fc/kernel', 100)]:
    assert np.std(np.asarray(params[p])) == pytest.approx(np.sqrt(2 / fan), rel=0.05)
  # The library's earlier convention stays available: N(0, 1) ring, fan-in.
  old = Ring(target, dof=5000, fan='in', ring_std=1.0)
  params = flatten(old.materialize(old.init(jax.random.key(0)), 0))
  assert np.std(np.asarray(params['fc/kernel'])) == pytest.approx(np.sqrt(2 / 512), rel=0.05)


def test_dof_fraction_and_errors():
  target = tiny_target(SHAPES)
  n = sum(int(np.prod(s)) for s in SHAPES.values())
  assert Ring(target, dof=0.1).dof == round(0.1 * n)
  with pytest.raises(ValueError, match='dof'):
    Ring(target, dof=0)
  with pytest.raises(ValueError, match='dof'):
    Ring(target, dof=float('nan'))
  with pytest.raises(ValueError, match='integer'):
    Ring(target, dof=2.5)
  with pytest.raises(ValueError, match='exceeds the 71 generated weights'):
    Ring(target, dof=72)
  with pytest.raises(ValueError, match='matches no leaf'):
    Ring(target, dof=3, select='nothing_here')
  with pytest.raises(ValueError, match='rest'):
    Ring(target, dof=3, rest='frozen')
  with pytest.raises(ValueError, match='assign'):
    Ring(target, dof=3, assign='blocks')
  with pytest.raises(ValueError, match='fan'):
    Ring(target, dof=3, fan='both')


@pytest.mark.parametrize('assign', ['global', 'window'])
@pytest.mark.parametrize('dof', [250, 333, 3159])
def test_ring_gradient_by_inverse_permutation_equals_the_scatter_add(assign, dof):
  # What TPU/GPU programs compute (gathers by the inverse permutation and
  # contiguous sums) against the definition: every element's cotangent times
  # its sign and constant, added into its ring position (numpy's add.at).
  ring = Ring(tiny_target({'a/kernel': (40, 50), 'b/kernel': (3, 3, 8, 16), 'c/kernel': (7,)}),
              dof=dof, assign=assign, select='kernel$')
  g = jax.random.normal(jax.random.key(3), (ring.num_generated,), jnp.float32)
  pos, sign, ids = (np.asarray(x) for x in ring.flat_indices(11))
  want = np.zeros(dof)
  np.add.at(want, pos, np.asarray(g) * np.asarray(ring._coefficients(sign, ids)))
  got = np.asarray(jax.jit(ring.ring_gradient)(g, jnp.uint32(11)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # ... and so does the CPU program's scatter-add, the one jax.grad takes here.
  np.testing.assert_allclose(np.asarray(jax.jit(ring.scatter_gradient)(g, jnp.uint32(11))),
                             want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_rpg_preset_lets_the_ring_carry_an_mlp_and_keeps_the_reference_split_for_resnets():
  """configs/rpg.py: '@stages' (stem and classifier ordinary) as the
  reference, unless they hold most kernel weights (an MLP: its first layer)."""
  from conftest import load_config

  from pemn_jax import config as config_lib
  mlp = load_config('rpg', 'model=mlp,dataset=mnist')
  # By hand: @stages of the (300, 100) MLP is its middle layer, 300 x 100 of
  # 784 x 300 + 300 x 100 + 100 x 10 kernel weights.
  assert config_lib.selected_share(mlp, '@stages') == pytest.approx(
      30000 / (784 * 300 + 30000 + 1000))
  assert mlp.param.select == '@kernels'
  assert load_config('rpg', 'model=resnet20,dataset=cifar10').param.select == '@stages'
  assert load_config('rpg', 'model=lenet5').param.select == '@stages'
  assert load_config('rpg', 'model=mlp,dataset=mnist,generate=@stages').param.select == '@stages'
