import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax.ops import num_kept, straight_through, topk_mask


def get_subnet(scores, k):
  """hidden-networks' / PEMN's GetSubnet.forward, transcribed to numpy: sort
  the scores, zero the first ``int((1 - k) * numel)``, set the rest to 1."""
  flat = np.asarray(scores, np.float32).reshape(-1)
  idx = np.argsort(flat, kind='stable')
  j = int((1 - k) * flat.size)
  out = np.empty(flat.size, np.float32)
  out[idx[:j]] = 0
  out[idx[j:]] = 1
  return out.reshape(np.shape(scores))


@pytest.mark.parametrize('n,keep', [(10, 0.5), (100, 0.9), (7, 0.3), (1000, 0.05), (64, 1.0),
                                    (3072, 0.1), (3, 0.5), (101, 0.7), (65536, 0.5),
                                    (588, 0.3), (1001, 0.99), (2400, 0.9)])
def test_topk_keeps_exactly_what_the_reference_keeps(n, keep):
  v = jax.random.normal(jax.random.key(n), (n,))
  m = np.asarray(topk_mask(v, keep))
  expected = get_subnet(np.asarray(v), keep)
  assert m.sum() == num_kept(n, keep) == expected.sum()
  np.testing.assert_array_equal(m, expected)


def test_kept_counts_differ_from_rounding_as_the_reference():
  # The example of the fidelity issue: 3072 weights at k = 0.1.
  assert num_kept(3072, 0.1) == 308 and round(0.1 * 3072) == 307
  assert num_kept(100, 0.9) == 91  # int((1 - 0.9) * 100) = int(9.999...) = 9
  rng = np.random.default_rng(0)
  for n, k in zip(rng.integers(1, 200_000, 300), rng.uniform(0.01, 1.0, 300)):
    n, k = int(n), float(k)
    assert num_kept(n, k) == max(1, int(get_subnet(np.arange(n), k).sum()))


def reference_topk(v, k):
  """The tail of a stable ascending argsort (edge-popup's rule), in numpy."""
  m = np.zeros(v.size, np.float32)
  m[np.argsort(v.reshape(-1), kind='stable')[v.size - k:]] = 1
  return m.reshape(v.shape)


@pytest.mark.parametrize('vals', [np.zeros(10), np.array([1., 2, 2, 2, 3, -1, 2, 0, -0.0, 5]),
                                  np.array([-3., -1, -2, -1, -5, -1e-30, 1e-30, np.inf, -np.inf])])
@pytest.mark.parametrize('keep', [0.1, 0.3, 0.5, 0.7])
def test_topk_ties_and_signs_match_stable_argsort(vals, keep):
  k = num_kept(vals.size, keep)
  m = np.asarray(topk_mask(jnp.asarray(vals, jnp.float32), keep))
  assert m.sum() == k
  np.testing.assert_array_equal(m, reference_topk(vals.astype(np.float32), k))


def test_edge_popup_straight_through_gradient():
  def mask(s):  # edge-popup's mask, as params.masks.Masked builds it
    a = jnp.abs(s)
    return straight_through(topk_mask(jax.lax.stop_gradient(a), 0.5), a)

  s = jnp.array([0.3, -2.0, 0.1, -0.05, 1.5, -0.7])
  w = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  c = jnp.array([0.5, -1.0, 2.0, 1.0, -3.0, 0.25])  # loss = sum(c * w * mask)
  loss = lambda s: jnp.sum(c * w * mask(s))
  # Forward: the 3 largest |s| are kept: -2.0, 1.5, -0.7.
  np.testing.assert_array_equal(np.asarray(mask(s)), [0, 1, 0, 0, 1, 1])
  # Backward by hand: dL/ds = c * w * sign(s) for every element (kept or not).
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(s)), np.asarray(c * w * jnp.sign(s)))


def test_bad_keep():
  with pytest.raises(ValueError, match='keep'):
    num_kept(10, 0.0)


def test_traced_count_matches_static_count():
  v = jax.random.normal(jax.random.key(5), (37,)).at[3:9].set(0.1)
  f = jax.jit(lambda v, k: topk_mask(v, kept=k))
  for k in (1, 5, 20, 37):
    np.testing.assert_array_equal(np.asarray(f(v, jnp.int32(k))), np.asarray(topk_mask(v, kept=k)))


def test_vmapped_variants_equal_the_reference_and_run_in_a_loop():
  # A sweep's stacked variants: per-variant values and counts, one with ties
  # at its threshold (the tie search runs) and the others without.
  rng = np.random.default_rng(3)
  vals = rng.standard_normal((4, 300)).astype(np.float32)
  vals[1, 10:60] = 0.25  # 50 ties, most of which straddle the 120th largest
  vals[1, :10] = 9.0
  ks = np.array([1, 120, 150, 300], np.int32)
  f = jax.jit(jax.vmap(lambda v, k: topk_mask(v, kept=k)))
  out = np.asarray(f(jnp.asarray(vals), jnp.asarray(ks)))
  for v, k, m in zip(vals, ks, out, strict=True):
    np.testing.assert_array_equal(m, reference_topk(v, int(k)))
  # On CPU the variants' cuts are found one after another: the count passes
  # (sums) run on one variant's 300 values, never on all four variants' 1,200
  # at once. Lowered for TPU they stay batched. Either way the masks are made
  # from the cuts in one batched pass.
  args = (jnp.asarray(vals), jnp.asarray(ks))
  cpu = f.trace(*args).lower(lowering_platforms=('cpu',)).as_text()
  tpu = f.trace(*args).lower(lowering_platforms=('tpu',)).as_text()

  def counts(text, shape):
    return [ln for ln in text.splitlines()
            if 'stablehlo.reduce' in ln and f'(tensor<{shape}xi32>' in ln]

  assert counts(cpu, '300') and not counts(cpu, '4x300')
  assert counts(tpu, '4x300') and not counts(tpu, '300')
  assert 'tensor<4x300xui32>' in cpu  # (the batched mask pass)
  # Differentiable (zero derivative), batched or not.
  g = jax.grad(lambda v: jnp.sum(jax.vmap(lambda x: topk_mask(x, 0.5) * x)(v)))(vals)
  np.testing.assert_array_equal(np.asarray(g), np.stack([reference_topk(v, 150) for v in vals]))
