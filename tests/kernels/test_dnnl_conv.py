"""oneDNN convolutions through XLA's FFI: values and gradients against direct
sums, when 'auto' takes them, and clear errors where they cannot run.

Value/gradient equality with XLA on many shapes: tests/kernels/test_conv.py
(parametrized over impl)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax.kernels import dnnl_conv

needs_onednn = pytest.mark.skipif(not dnnl_conv._installed(),
                                  reason="oneDNN is not installed (pip install -e '.[cpu]')")


def _direct(x, w, strides, pads, g):
  """Forward, input gradient and kernel gradient of sum(g * conv(x, w)) by
  numpy loops over the definition."""
  xp = np.pad(x, ((0, 0), *pads, (0, 0))).astype(np.float64)
  n, hp, wp, c = xp.shape
  kh, kw, _, k = w.shape
  sh, sw = strides
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  y = np.zeros((n, ho, wo, k))
  dxp, dw = np.zeros_like(xp), np.zeros((kh, kw, c, k))
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :]        # n, kh, kw, c
      y[:, i, j] = np.einsum('nabc,abck->nk', patch, w)
      dw += np.einsum('nabc,nk->abck', patch, g[:, i, j])
      dxp[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :] += np.einsum('abck,nk->nabc', w, g[:, i, j])
  (t, _), (left, _) = pads
  dx = dxp[:, t:t + x.shape[1], left:left + x.shape[2]]
  return y, dx, dw


@needs_onednn
@pytest.mark.parametrize('case', [
    ((3, 7, 6, 2), (3, 3, 2, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 3), (3, 2, 3, 5), (2, 3), ((2, 0), (1, 2))),   # odd sizes, uneven pads
    ((4, 5, 5, 1), (5, 5, 1, 2), (1, 1), ((0, 0), (0, 0))),
    ((1, 8, 8, 4), (1, 1, 4, 3), (2, 2), ((1, 0), (0, 1))),   # padded 1x1 (not a matmul)
], ids=str)
def test_forward_and_gradients_against_direct_sums(case):
  xs, ws, strides, pads = case
  rng = np.random.default_rng(len(str(case)))
  x = rng.standard_normal(xs).astype(np.float32)
  w = rng.standard_normal(ws).astype(np.float32)
  y_ref_shape = dnnl_conv.out_shape(xs, ws, strides, pads)
  g = rng.standard_normal(y_ref_shape).astype(np.float32)
  y, dx, dw = _direct(x, w, strides, pads, g)
  conv = lambda x, w: dnnl_conv.conv(x, w, strides, pads)  # noqa: E731
  got_y, vjp = jax.vjp(jax.jit(conv), jnp.asarray(x), jnp.asarray(w))
  got_dx, got_dw = vjp(jnp.asarray(g))
  for got, want in ((got_y, y), (got_dx, dx), (got_dw, dw)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


AUTO = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from pemn_jax import models
from pemn_jax.kernels import conv as C
model = models.get('resnet20', num_classes=10, width=4)
x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16, 16, 3)), jnp.float32)
variables = model.init(jax.random.key(0), x, train=False)

def grads(impl):
  C.DEFAULT_IMPL = impl
  def loss(p):
    y, _ = model.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.tanh(y))
  f = jax.jit(jax.grad(loss))
  hlo = f.lower(variables['params']).as_text()
  return f(variables['params']), hlo

auto, hlo = grads('auto')
print('devices', jax.device_count(), 'onednn', 'PemnDnnlConvBwdWeights' in hlo)
again, _ = grads('auto')
ref, ref_hlo = grads('xla')
assert 'PemnDnnlConv' not in ref_hlo
for a, b, c in zip(jax.tree.leaves(auto), jax.tree.leaves(ref), jax.tree.leaves(again)):
  np.testing.assert_array_equal(a, c)  # run to run: the same bits
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
print('equal')
'''


@needs_onednn
@pytest.mark.parametrize('devices', [1, 2])
def test_auto_takes_onednn_on_one_device_only(devices):
  """'auto' calls oneDNN in a one-device CPU process (a ResNet's gradients as
  XLA's, the same bits run to run), and not where the batch may be sharded."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), XLA_FLAGS='', PEMN_JAX_CONV='auto')
  r = subprocess.run([sys.executable, '-c', AUTO], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'devices {devices} onednn {devices == 1}' in r.stdout, r.stdout
  assert 'equal' in r.stdout


def test_missing_pieces_are_named(monkeypatch, tmp_path):
  import importlib.metadata as md
  real = md.distribution

  def without_runtime(name):
    if name == dnnl_conv.RUNTIME:
      raise md.PackageNotFoundError(name)
    return real(name)

  monkeypatch.setattr(dnnl_conv.importlib.metadata, 'distribution', without_runtime)
  with pytest.raises(dnnl_conv.Unavailable, match=r"onednn-cpu-gomp package is not installed"
                                                  r".*\.\[cpu\]"):
    dnnl_conv.build()
  monkeypatch.setattr(dnnl_conv.importlib.metadata, 'distribution', real)
  if not dnnl_conv._installed():
    return
  monkeypatch.setenv('CXX', 'no-such-compiler-x')
  with pytest.raises(dnnl_conv.Unavailable, match='no C.. compiler .no-such-compiler-x.'):
    dnnl_conv.build()


@needs_onednn
def test_a_failed_compilation_is_reported_and_leaves_nothing(monkeypatch, tmp_path):
  bad = tmp_path / 'bad.cc'
  bad.write_text('this is not C++;\n')
  monkeypatch.setattr(dnnl_conv, 'SOURCE', bad)
  monkeypatch.setenv('PEMN_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  with pytest.raises(dnnl_conv.Unavailable, match=r'compiling bad.cc failed(.|\n)*error'):
    dnnl_conv.build()
  assert os.listdir(tmp_path / 'cache' / 'ffi') == []  # no half-written library


def test_forcing_onednn_where_unavailable_is_a_clear_error(monkeypatch):
  from pemn_jax.kernels import conv as C
  monkeypatch.setattr(dnnl_conv, '_load', lambda: (None, 'the test says so'))
  x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
  with pytest.raises(dnnl_conv.Unavailable, match='unavailable: the test says so'):
    C.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                           impl='onednn')
  assert not C._use_onednn('auto')  # 'auto' falls back instead


@needs_onednn
def test_an_unwritable_cache_dir_is_named(monkeypatch, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  monkeypatch.setenv('PEMN_JAX_CACHE_DIR', str(blocker / 'cache'))
  monkeypatch.setattr(dnnl_conv, 'SOURCE', tmp_path / 'x.cc')  # a key not cached anywhere
  (tmp_path / 'x.cc').write_text('// nothing\n')
  with pytest.raises(dnnl_conv.Unavailable, match='cannot write .*PEMN_JAX_CACHE_DIR'):
    dnnl_conv.build()


@needs_onednn
def test_independent_convolutions_called_from_several_threads_at_once():
  """Kernel gradients of six independent layers in one program (XLA may run
  them side by side; the handlers take turns) and three Python threads calling
  it at once: every result equals XLA's own convolution's, none hangs."""
  import concurrent.futures
  rng = np.random.default_rng(7)
  xs = [jnp.asarray(rng.standard_normal((4, 10, 10, 3 + i)), jnp.float32) for i in range(6)]
  ws = [jnp.asarray(rng.standard_normal((3, 3, 3 + i, 5)), jnp.float32) for i in range(6)]
  pads = ((1, 1), (1, 1))

  def loss(ws, xs, conv):
    return sum(jnp.sum(jnp.tanh(conv(x, w))) for x, w in zip(xs, ws))

  onednn = jax.jit(jax.grad(lambda ws, xs: loss(ws, xs, lambda x, w: dnnl_conv.conv(
      x, w, (1, 1), pads))))
  assert 'PemnDnnlConvBwdWeights' in onednn.lower(ws, xs).as_text()
  want = jax.jit(jax.grad(lambda ws, xs: loss(ws, xs, lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')))))(ws, xs)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    runs = [pool.submit(onednn, ws, xs) for _ in range(6)]
    got = [r.result(timeout=300) for r in runs]
  for g in got:
    for a, b in zip(g, want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_compiled_libraries_are_keyed_by_their_flags(monkeypatch, tmp_path):
  """A change of compiler flags alone (e.g. a new link flag) compiles afresh,
  never reuses a library built without it."""
  import shutil

  from pemn_jax.kernels import native
  if shutil.which('g++') is None or not sys.platform.startswith('linux'):
    pytest.skip('needs g++ on Linux')
  monkeypatch.setenv('PEMN_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  src = tmp_path / 'k.cc'
  src.write_text('extern "C" int pemn_test_one() { return 1; }\n')
  plain = native.build(src, 'k')
  again = native.build(src, 'k')
  flagged = native.build(src, 'k', ('-DPEMN_TEST_FLAG',))
  assert plain == again and flagged != plain
  assert sorted(p.name for p in (tmp_path / 'cache' / 'ffi').iterdir()) == sorted(
      {plain.name, flagged.name})


@needs_onednn
@pytest.mark.parametrize('case', [
    ((2, 9, 8, 6), (3, 3, 2, 9), (1, 1), ((1, 1), (1, 1)), 3),
    ((4, 10, 10, 8), (5, 5, 1, 8), (1, 1), ((2, 2), (2, 2)), 8),   # depthwise
    ((3, 7, 9, 4), (4, 3, 1, 8), (2, 1), ((1, 2), (0, 2)), 4),     # depthwise x2, uneven
], ids=str)
def test_grouped_convolutions_equal_xlas(case):
  """Grouped convolutions (``groups``): values and both gradients against
  XLA's ``feature_group_count`` convolution."""
  xs, ws, strides, pads, groups = case
  rng = np.random.default_rng(len(str(case)))
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
  want, want_vjp = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups), x, w)
  got, got_vjp = jax.vjp(jax.jit(lambda x, w: dnnl_conv.conv(x, w, strides, pads, groups)), x, w)
  g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  for a, b in zip((got, *got_vjp(g)), (want, *want_vjp(g))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
  with pytest.raises(ValueError, match='do not split into 5 groups'):
    dnnl_conv.conv(x, w, strides, pads, 5)
