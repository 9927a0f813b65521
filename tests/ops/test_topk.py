import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax.kernels import topk_cut
from pemn_jax.ops import num_kept, straight_through, topk_mask
from pemn_jax.ops.topk import _cut, use_kernel


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


def counts(text, shape):
  """The lowered program's count passes (int32 sums) over ``shape``."""
  return [ln for ln in text.splitlines()
          if 'stablehlo.reduce' in ln and f'(tensor<{shape}xi32>' in ln]


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
  # On CPU the variants' cuts come from the C++ kernel (one call on all four
  # rows), or where it cannot be built from count passes on one variant's 300
  # values at a time, never on all four variants' 1,200 at once. Lowered for
  # TPU they stay batched count passes. Either way the masks are made from the
  # cuts in one batched pass.
  args = (jnp.asarray(vals), jnp.asarray(ks))
  cpu = f.trace(*args).lower(lowering_platforms=('cpu',)).as_text()
  tpu = f.trace(*args).lower(lowering_platforms=('tpu',)).as_text()
  if use_kernel():
    assert not counts(cpu, '300') and not counts(cpu, '4x300')
    assert re.search(r'custom_call @PemnTopkCut\(.*tensor<4x300xf32>', cpu)
  else:
    assert counts(cpu, '300') and not counts(cpu, '4x300')
  assert counts(tpu, '4x300') and not counts(tpu, '300') and 'custom_call' not in tpu
  assert 'tensor<4x300xui32>' in cpu  # (the batched mask pass)
  # Differentiable (zero derivative), batched or not.
  g = jax.grad(lambda v: jnp.sum(jax.vmap(lambda x: topk_mask(x, 0.5) * x)(v)))(vals)
  np.testing.assert_array_equal(np.asarray(g), np.stack([reference_topk(v, 150) for v in vals]))


def edge_rows():
  """Rows with what a cut must get right: ties straddling it, all equal,
  signed zeros, infinities, NaNs, subnormals; and their counts."""
  rng = np.random.default_rng(7)
  rows = [rng.standard_normal(500), rng.integers(0, 3, 500), np.full(500, 0.5),
          rng.integers(-5, 5, 500) * 1e-40, rng.standard_normal(500)]
  rows[4][::7] = rng.choice([0.0, -0.0, np.inf, -np.inf, np.nan], rows[4][::7].size)
  rows = np.stack(rows).astype(np.float32)
  return rows, [1, 2, 167, 250, 333, 499, 500]


def test_cpu_kernel_cuts_equal_the_count_passes():
  if not topk_cut.available():
    pytest.skip(f'no CPU top-k kernel here: {topk_cut.unavailable_reason()}')
  rows, ms = edge_rows()
  for m in ms:
    k = jnp.full(len(rows), m, jnp.int32)
    for mag in (False, True):  # magnitude: the count passes' cut of abs(rows)
      want = jax.jit(jax.vmap(_cut))(jnp.abs(rows) if mag else jnp.asarray(rows), k)
      got = jax.jit(lambda v, k, mag=mag: topk_cut.cut(v, k, magnitude=mag))(rows, k)
      for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f'm={m} {mag}')
  # and its masks against the stable argsort (NaN-free rows)
  f = jax.jit(jax.vmap(lambda v, k: topk_mask(v, kept=k)))
  fa = jax.jit(jax.vmap(lambda v, k: topk_mask(v, kept=k, magnitude=True)))
  for m in ms:
    out = np.asarray(f(jnp.asarray(rows[:4]), jnp.full(4, m, jnp.int32)))
    out_abs = np.asarray(fa(jnp.asarray(rows[:4]), jnp.full(4, m, jnp.int32)))
    for v, o, oa in zip(rows[:4], out, out_abs, strict=True):
      np.testing.assert_array_equal(o, reference_topk(v, m))
      np.testing.assert_array_equal(oa, reference_topk(np.abs(v), m))


def test_without_the_cpu_kernel_the_count_passes_run(monkeypatch):
  monkeypatch.setattr(topk_cut, '_load', lambda: 'no compiler (the test says so)')
  assert not topk_cut.available()
  rows, ms = edge_rows()
  f = jax.jit(jax.vmap(lambda v, k: topk_mask(v, kept=k)))
  one = jax.jit(lambda v, k: topk_mask(v, kept=k))
  one_abs = jax.jit(lambda v, k: topk_mask(v, kept=k, magnitude=True))
  for m in ms[::2]:
    out = np.asarray(f(jnp.asarray(rows[:4]), jnp.full(4, m, jnp.int32)))
    for v, o in zip(rows[:4], out, strict=True):
      np.testing.assert_array_equal(o, reference_topk(v, m))
      np.testing.assert_array_equal(np.asarray(one(jnp.asarray(v), jnp.int32(m))), o)
      np.testing.assert_array_equal(np.asarray(one_abs(jnp.asarray(v), jnp.int32(m))),
                                    reference_topk(np.abs(v), m))
  text = one.trace(jnp.asarray(rows[0]), jnp.int32(3)).lower(lowering_platforms=('cpu',)).as_text()
  assert counts(text, '500') and 'custom_call' not in text


def test_several_devices_keep_the_count_passes():
  # Scores sharded over devices: the count passes work slice by slice, where
  # the (unpartitionable) kernel would gather each layer to every device.
  code = '''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from pemn_jax.ops import topk_mask
from pemn_jax.ops.topk import use_kernel
v = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal(4000), jnp.float32),
                   NamedSharding(jax.make_mesh((2,), ('d',)), P('d')))
f = jax.jit(lambda v: topk_mask(v, 0.3, magnitude=True))
text = f.trace(v).lower(lowering_platforms=('cpu',)).as_text()
print(use_kernel(), 'custom_call' in text, int(np.asarray(f(v)).sum()))
'''
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2')
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ['False', 'False', str(num_kept(4000, 0.3))], r.stdout
