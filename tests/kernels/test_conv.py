"""The CPU convolution path: the same values and gradients as XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from pemn_jax.kernels import conv as C
from pemn_jax.kernels import dnnl_conv

DN = ('NHWC', 'HWIO', 'NHWC')
# 'onednn' where its wheels are installed (the test extra installs them; then
# a failure to build it fails its tests here rather than skipping them)
IMPLS = ['cpu', pytest.param('onednn', marks=pytest.mark.skipif(
    not dnnl_conv._installed(), reason="oneDNN is not installed (pip install -e '.[cpu]')"))]

CASES = [  # (N, H, W, Cin, Cout, kh, kw, strides, padding)
    (4, 8, 8, 3, 5, 3, 3, (1, 1), 'SAME'),
    (3, 9, 7, 4, 6, 3, 3, (2, 2), 'SAME'),
    (2, 11, 11, 5, 3, 5, 5, (1, 1), 'VALID'),
    (5, 10, 13, 2, 7, 1, 1, (2, 2), 'SAME'),
    (3, 6, 6, 9, 5, 1, 1, (1, 1), 'VALID'),
    (2, 5, 7, 4, 3, 1, 1, (1, 1), ((1, 0), (0, 1))),
    (2, 7, 9, 3, 4, 3, 2, (2, 1), ((2, 0), (1, 3))),
    (6, 5, 5, 8, 8, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (1, 12, 12, 3, 4, 4, 4, (4, 4), 'VALID'),
    (7, 6, 6, 1, 1, 3, 3, (3, 2), 'SAME'),
]


def _loss(conv, x, w, strides, padding, proj):
  return jnp.sum(proj * conv(x, w, strides, padding, dimension_numbers=DN) ** 2) / 3


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_values_and_gradients_equal_xla(case, impl):
  n, h, w_, cin, cout, kh, kw, strides, padding = case
  rng = np.random.default_rng(sum(case[:7]))
  x = jnp.asarray(rng.standard_normal((n, h, w_, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)), jnp.float32)
  assert C.fast_path(x, w, dimension_numbers=DN, impl=impl)
  ours = jax.jit(lambda x, w: C.conv_general_dilated(x, w, strides, padding,
                                                     dimension_numbers=DN, impl=impl))
  ref = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  if (kh, kw) == (1, 1) or impl == 'onednn':  # a matrix product / oneDNN's sums
    np.testing.assert_allclose(ours(x, w), ref, rtol=1e-5, atol=1e-5 * float(jnp.max(abs(ref))))
  else:
    np.testing.assert_array_equal(ours(x, w), ref)  # the forward is XLA's
  hlo = ours.lower(x, w).as_text()
  pointwise = (kh, kw) == (1, 1) and (isinstance(padding, str) or not np.any(padding))
  assert ('PemnDnnlConvFwd' in hlo) == (impl == 'onednn' and not pointwise)
  proj = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  f = lambda *a, **k: C.conv_general_dilated(*a, **k, impl=impl)  # noqa: E731
  g_ours = jax.jit(jax.grad(lambda x, w: _loss(f, x, w, strides, padding, proj), (0, 1)))(x, w)
  g_ref = jax.grad(lambda x, w: _loss(lax.conv_general_dilated, x, w, strides, padding, proj),
                   (0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_kernel_grad_against_a_direct_sum():
  """The kernel gradient against numpy's loop over the definition."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 6, 5, 2)).astype(np.float32)
  g = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)  # stride 2, SAME pads (0,1),(1,1)
  pads = ((0, 1), (1, 1))
  got = C.kernel_grad(jnp.asarray(x), jnp.asarray(g), (2, 3), (2, 2), pads)
  xp = np.pad(x, ((0, 0), *pads, (0, 0)))
  want = np.zeros((2, 3, 2, 4), np.float64)
  for i in range(2):
    for j in range(3):
      for h in range(3):
        for w in range(3):
          want[i, j] += np.einsum('nc,nk->ck', xp[:, 2 * h + i, 2 * w + j], g[:, h, w])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_large_batch_is_chunked(monkeypatch):
  monkeypatch.setattr(C, 'CHUNK_BYTES', 5 * 10 * 10 * 4 * 4)
  assert C._chunk(12, 10 * 10 * 4 * 4) == 4   # multiples of gcd(12, 8) = 4 that fit
  assert C._chunk(7, 10 * 10 * 4 * 4) == 1
  assert C._chunk(16, 10 ** 9) == 8          # never below gcd(n, 8)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((12, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 2)), jnp.float32)
  ours = jax.grad(lambda w: jnp.sum(C.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                           dimension_numbers=DN, impl='cpu') ** 2))
  ref = jax.grad(lambda w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                            dimension_numbers=DN) ** 2))
  np.testing.assert_allclose(ours(w), ref(w), rtol=2e-5, atol=1e-4)


def test_other_convolutions_take_xla_path():
  x = jnp.ones((2, 6, 6, 4))
  w = jnp.ones((3, 3, 4, 4))
  assert not C.fast_path(x, w, rhs_dilation=(2, 2), dimension_numbers=DN, impl='cpu')
  assert not C.fast_path(x, jnp.ones((3, 3, 2, 4)), dimension_numbers=DN,
                         feature_group_count=2, impl='cpu')
  assert not C.fast_path(x.astype(jnp.bfloat16), w, dimension_numbers=DN, impl='cpu')
  assert not C.fast_path(jnp.ones((2, 4, 6, 6)), jnp.ones((4, 4, 3, 3)),
                         dimension_numbers=('NCHW', 'OIHW', 'NCHW'), impl='cpu')
  assert not C.fast_path(x, w, dimension_numbers=DN, impl='xla')
  with pytest.raises(ValueError, match='conv impl'):
    C.fast_path(x, w, dimension_numbers=DN, impl='fast')
  # Dilated and grouped convolutions still give lax's values through the drop-in.
  y = C.conv_general_dilated(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=DN)
  np.testing.assert_array_equal(y, lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=DN))


@pytest.mark.parametrize('impl', IMPLS)
def test_flax_conv_with_the_drop_in_matches_and_vmaps(impl):
  """nn.Conv(conv_general_dilated=...) gives nn.Conv's values and gradients,
  also under vmap (ablations stack states)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 9, 9, 3)), jnp.float32)
  fast = nn.Conv(6, (3, 3), (2, 2), padding=1,
                 conv_general_dilated=lambda *a, **k: C.conv_general_dilated(*a, **k, impl=impl))
  plain = nn.Conv(6, (3, 3), (2, 2), padding=1)
  params = jax.vmap(lambda k: plain.init(k, x))(jax.random.split(jax.random.key(0), 3))
  loss = lambda m: lambda p: jnp.sum(jnp.tanh(m.apply(p, x)))  # noqa: E731
  g_fast = jax.jit(jax.vmap(jax.value_and_grad(loss(fast))))(params)
  g_plain = jax.vmap(jax.value_and_grad(loss(plain)))(params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


SHARDED = r'''
import re, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from pemn_jax.kernels import conv as C
mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
DN = ('NHWC', 'HWIO', 'NHWC')
rng = np.random.default_rng(0)
x = jax.device_put(rng.standard_normal((32, 8, 8, 4)).astype(np.float32),
                   NamedSharding(mesh, P('data')))
w = jax.device_put(rng.standard_normal((3, 3, 4, 5)).astype(np.float32), NamedSharding(mesh, P()))
grads = {}
for impl in ('xla', 'cpu'):
  f = jax.jit(jax.grad(lambda x, w: jnp.sum(C.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=DN, impl=impl) ** 2), (0, 1)))
  hlo = f.lower(x, w).compile().as_text()
  print(impl, 'all-gathers', len(re.findall(r'= [^\n]*all-gather\(', hlo)))
  grads[impl] = f(x, w)
for a, b in zip(grads['cpu'], grads['xla']):
  np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4)
print('equal')
'''


def test_sharded_batch_kernel_gradient_stays_per_device():
  """On a batch split over 4 devices, the kernel gradient reduces each
  device's own examples: no activation is all-gathered; values as XLA's."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='4', XLA_FLAGS='')
  r = subprocess.run([sys.executable, '-c', SHARDED], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'cpu all-gathers 0' in r.stdout and 'equal' in r.stdout, r.stdout
