import jax
import numpy as np
import pytest
from conftest import tiny_target, tree_equal

from pemn_jax import models
from pemn_jax.params import Prototype, rp_length
from pemn_jax.params.base import fan_in
from pemn_jax.pytrees import flatten

SHAPES = {'a/kernel': (3, 3, 8, 8), 'b/kernel': (3, 3, 8, 8), 'c/kernel': (8, 4), 'c/bias': (4,),
          'd/kernel': (3, 3, 8, 16)}


def gen(p: Prototype, seed=0):
  params = flatten(p.materialize(p.init(jax.random.key(0)), seed))
  return {k: np.asarray(v) for k, v in params.items()}


def test_rp_lengths_for_convmixer_256_6():
  target = models.abstract_params(models.get('convmixer_256_6'), (32, 32, 3))
  lengths = []
  for ratio in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
    p = Prototype(target, mode='rp', ratio=ratio)
    assert p.n_max == 65_536
    lengths.append(p.length)
    assert p.storage_bits()['prototype_floats'] == 32 * p.length
  assert lengths == [6554, 656, 66, 7, 1]
  assert [rp_length(65_536, r) for r in (1e-1, 1e-5)] == [6554, 1]


def test_rp_single_value():
  p = Prototype(tiny_target(SHAPES), mode='rp', ratio=1e-5, rescale=False)
  assert p.length == 1
  vals = np.concatenate([v.reshape(-1) for k, v in gen(p).items() if k.endswith('kernel')])
  assert np.unique(vals).size == 1 and vals[0] != 0
  # With rescaling, each leaf is that one value times its own std.
  r = gen(Prototype(tiny_target(SHAPES), mode='rp', ratio=1e-5))
  assert all(np.unique(r[k]).size == 1 for k in p.generated)


def test_rp_tiles_the_vector():
  p = Prototype(tiny_target(SHAPES), mode='rp', ratio=0.01, rescale=False)  # d_v = 12
  vec = np.asarray(p.vector(0)) * p.std(p.largest)
  g = gen(p)
  for k in p.generated:
    flat = g[k].reshape(-1)
    np.testing.assert_allclose(flat, vec[np.arange(flat.size) % p.length], rtol=1e-6)
  perm = gen(Prototype(tiny_target(SHAPES), mode='rp', ratio=0.01, rescale=False, permute=True))
  d = perm['d/kernel'].reshape(-1)
  assert not np.allclose(d, g['d/kernel'].reshape(-1))
  assert np.isin(np.round(d, 6), np.round(vec, 6)).all()  # same values, other order


def test_ol_repeats_the_first_layer_of_each_shape():
  g = gen(Prototype(tiny_target(SHAPES), mode='ol'))
  np.testing.assert_array_equal(g['a/kernel'], g['b/kernel'])
  assert not np.allclose(g['a/kernel'].reshape(-1)[:100], g['d/kernel'].reshape(-1)[:100])
  p = Prototype(tiny_target(SHAPES), mode='ol')
  assert p.prototype_floats() == 576 + 32 + 1152  # a, c, d own values; b reuses a


def test_mp_takes_prefixes_of_the_largest_layer():
  p = Prototype(tiny_target(SHAPES), mode='mp', rescale=False)
  assert p.largest == 'd/kernel' and p.n_max == 1152
  g = gen(p)
  big = g['d/kernel'].reshape(-1)
  for k in p.generated:
    np.testing.assert_array_equal(g[k].reshape(-1), big[:g[k].size])


def test_rescale_gives_each_leaf_kaiming_std():
  target = tiny_target({'x/kernel': (3, 3, 64, 64), 'y/kernel': (256, 128)})
  g = gen(Prototype(target, mode='rp', ratio=0.2, rescale=True))
  for k, shape in [('x/kernel', (3, 3, 64, 64)), ('y/kernel', (256, 128))]:
    assert g[k].std() == pytest.approx(np.sqrt(2 / fan_in(shape)), rel=0.06)
  # The default (the reference's): every leaf at the largest layer's scale.
  g0 = gen(Prototype(target, mode='rp', ratio=0.2))
  assert g0['y/kernel'].std() == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.06)
  assert g0['x/kernel'].std() == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.06)


def test_signed_constant_has_the_reference_magnitude_and_random_signs():
  # hidden-networks' signed_constant: sign(w) * gain / sqrt(fan_in), gain = sqrt(2)
  # for ReLU, fan_in = in_channels * kh * kw (PyTorch's fan of an (out, in, kh, kw)
  # weight; here (kh, kw, in, out)).
  target = tiny_target({'conv/kernel': (3, 3, 16, 32), 'fc/kernel': (200, 10), 'fc/bias': (10,)})
  p = Prototype(target, mode='signed_constant')
  g = gen(p, 3)
  for k, fan in [('conv/kernel', 3 * 3 * 16), ('fc/kernel', 200)]:
    np.testing.assert_allclose(np.abs(g[k]), np.sqrt(2.0) / np.sqrt(fan), rtol=1e-6)
    assert abs(np.mean(np.sign(g[k]))) < 0.1
  assert not np.array_equal(g['conv/kernel'], gen(p, 4)['conv/kernel'])
  assert tree_equal(g, gen(p, 3))
  assert p.prototype_floats() == 0 and p.export_generated({}, 3) == {}


@pytest.mark.parametrize('mode', ['dense', 'signed_constant', 'ol', 'mp', 'rp'])
def test_deterministic_in_seed(mode):
  p = Prototype(tiny_target(SHAPES), mode=mode)
  a = gen(p, 5)
  assert tree_equal(a, gen(p, 5))
  assert not np.array_equal(a['d/kernel'], gen(p, 6)['d/kernel'])
  assert sum(x.size for x in jax.tree.leaves(p.init(jax.random.key(0)))) == 4  # only c/bias


def test_bad_mode_and_ratio():
  with pytest.raises(ValueError, match='mode'):
    Prototype(tiny_target(SHAPES), mode='xx')
  with pytest.raises(ValueError, match='ratio'):
    Prototype(tiny_target(SHAPES), mode='rp', ratio=0)
