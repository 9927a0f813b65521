"""Model files: bit-identical rebuild, same accuracy, clear errors, codecs."""

import json
import os
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
from conftest import REPO, minimal_header, tiny_config, tree_equal

from pemn_jax import cli
from pemn_jax.evaluate import evaluate_artifact
from pemn_jax.export import artifact, codecs
from pemn_jax.export.model_file import export_run, load
from pemn_jax.params import sections
from pemn_jax.train.loop import train_and_evaluate
from pemn_jax.train.run import restore

PEMN = {'name': 'masked', 'keep': 0.3,
        'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-2}}


@pytest.fixture(scope='module')
def trained(mnist_slice, tmp_path_factory):
  wd = tmp_path_factory.mktemp('run')
  c = tiny_config(mnist_slice, param=PEMN, **{'optimizer.lr': 0.05})
  out = train_and_evaluate(c, str(wd))
  return wd, out, mnist_slice


def test_export_and_restore_build_no_optimizer(trained, tmp_path, monkeypatch):
  # A run's trained model is read without its optimizer state: exporting (and
  # evolve / evaluate, which restore the same way) never builds an optimizer.
  from pemn_jax.train import optim
  from pemn_jax.train import run as run_lib

  def no_optimizer(*args, **kwargs):
    raise AssertionError('an optimizer was built')

  monkeypatch.setattr(optim, 'make_optimizer', no_optimizer)
  monkeypatch.setattr(run_lib, 'make_optimizer', no_optimizer)
  wd = trained[0]
  assert restore(str(wd)).train_state.opt_state is None
  assert export_run(str(wd), str(tmp_path / 'm.pemn'))['file_bytes'] > 0


def test_file_rebuilds_bit_identical_params_and_same_accuracy(trained, tmp_path):
  wd, out, mnist_slice = trained
  path = str(tmp_path / 'model.pemn')
  res = export_run(str(wd), path, params_dir=str(tmp_path / 'params'))
  assert res['file_bytes'] == os.path.getsize(path)
  r = restore(str(wd))
  param, ts = r.param, r.train_state
  header, _, params, model_state = load(path)
  assert tree_equal(params, jax.jit(param.materialize)(ts.state, ts.seed))
  assert tree_equal(model_state, ts.model_state)
  ev = evaluate_artifact(path, 'mnist', mnist_slice['data_dir'], mnist_slice['source_dir'])
  assert ev['accuracy'] == pytest.approx(out['test_accuracy'], abs=1e-9)
  # The file is much smaller than the dense float32 params.
  assert res['file_bytes'] < 4 * param.num_params / 5
  # The orbax export holds the same dense params.
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / 'params'))
  assert tree_equal(restored['params'], params)


def test_float16_storage_is_close_not_identical(trained, tmp_path):
  wd, _, _ = trained
  f32, f16 = str(tmp_path / 'a.pemn'), str(tmp_path / 'b.pemn')
  export_run(str(wd), f32, params_dir=None)
  export_run(str(wd), f16, float_codec='f16', params_dir=None)
  assert os.path.getsize(f16) < os.path.getsize(f32)
  a, b = load(f32)[2], load(f16)[2]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-3, atol=1e-4)


def test_truncated_corrupt_and_wrong_version_files(trained, tmp_path):
  wd, _, _ = trained
  path = str(tmp_path / 'm.pemn')
  export_run(str(wd), path, params_dir=None)
  data = open(path, 'rb').read()
  cases = {'trunc': (data[:len(data) // 2], 'truncated or corrupted'),
           'flip': (data[:100] + bytes([data[100] ^ 1]) + data[101:], 'truncated or corrupted'),
           'magic': (b'NOTAPEMN' + data[8:], 'not a pemn_jax model file'),
           'version': (data[:8] + (7).to_bytes(4, 'little') + data[12:], 'format version 7'),
           'empty': (b'', 'not a pemn_jax model file')}
  for name, (blob, msg) in cases.items():
    bad = tmp_path / f'{name}.pemn'
    bad.write_bytes(blob)
    with pytest.raises(artifact.ArtifactError, match=msg):
      artifact.read(str(bad))
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.evaluate', '--artifact',
                      str(tmp_path / 'trunc.pemn')], cwd=REPO, capture_output=True, text=True)
  assert p.returncode == 2 and 'truncated or corrupted' in p.stderr


def test_cli_export_report(trained, tmp_path):
  wd, _, _ = trained
  out = tmp_path / 'cli.pemn'
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={wd}', f'--out={out}',
                      '--report'], cwd=REPO, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr
  assert 'bits per weight' in p.stdout and 'H(k)' in p.stdout
  assert os.path.isdir(str(out) + '.params')
  # every mask codec can be asked for by name; each file rebuilds the same params
  for codec in ('rans1', 'bits'):
    one = tmp_path / f'{codec}.pemn'
    p = subprocess.run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={wd}',
                        f'--out={one}', f'--mask_codec={codec}', '--params_dir='], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    masks = [s for s in artifact.read(str(one))[0]['sections'] if sections.is_mask(s['name'])]
    assert masks and {s['codec'] for s in masks} == {codec}
    assert tree_equal(load(str(one))[2], load(str(out))[2])
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={tmp_path / "none"}',
                      f'--out={tmp_path / "x.pemn"}'], cwd=REPO, capture_output=True, text=True)
  assert p.returncode == 2 and 'no checkpoint' in p.stderr


@pytest.mark.parametrize('n,k', [(1, 1.0), (9, 0.5), (1000, 0.1), (50_000, 0.03), (4096, 0.97),
                                 (4097, 0.2), (300_000, 0.01), (8, 0.0)])
def test_mask_codecs_roundtrip_and_rans_reaches_entropy(n, k):
  rng = np.random.default_rng(n)
  m = np.zeros(n, bool)
  m[rng.permutation(n)[:round(k * n)]] = True
  for codec in codecs.MASK_CODECS:
    blob = codecs.encode_mask(m, codec)
    np.testing.assert_array_equal(codecs.decode_mask(blob, codec, (n,), int(m.sum())), m)
  # n * H(k) within 1%, plus 32 bits of final state per 4096-weight stream.
  rans = 8 * len(codecs.encode_mask(m, 'rans'))
  bound = codecs.entropy_bits(int(m.sum()), n) * 1.01 + 32 * codecs.rans_streams(n) + 16
  assert rans <= bound


def test_rans_decodes_an_11m_mask_fast_and_rejects_corrupt_data():
  import time
  rng = np.random.default_rng(0)
  m = rng.random(11_200_000) < 0.3  # ResNet-18-sized
  blob = codecs.encode_mask(m, 'rans')
  t0 = time.perf_counter()
  out = codecs.decode_mask(blob, 'rans', m.shape, int(m.sum()))
  # Not a speed claim (benchmarks/ hold those): a guard against a decoder that
  # went per-symbol Python (minutes). ~0.2 s alone on 2 cores; 12 s was seen
  # with the machine loaded, so the bound is loose.
  assert time.perf_counter() - t0 < 60.0
  np.testing.assert_array_equal(out, m)
  for bad, msg in [(blob[:-2], 'truncated|corrupt'), (blob[:100] + bytes([blob[100] ^ 8]) +
                                                       blob[101:], 'corrupt|wrong number'),
                   (blob + b'\0\0', 'corrupt'), (b'\1\2\3', 'does not fit')]:
    with pytest.raises(ValueError, match=msg):
      codecs.decode_mask(bad, 'rans', m.shape, int(m.sum()))
  with pytest.raises(ValueError, match='wrong number|corrupt'):
    codecs.decode_mask(blob, 'rans', m.shape, int(m.sum()) + 1)


@pytest.mark.parametrize('sparsity', [0.0, 0.5, 0.9, 0.999])
def test_sparse_float_sections_roundtrip_and_shrink(sparsity, tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 40)).astype(np.float32)
  x[rng.random(x.shape) < sparsity] = 0
  path = str(tmp_path / 's.pemn')
  size = artifact.write(path, minimal_header(), {'w': x})
  header, arrays = artifact.read(path)
  np.testing.assert_array_equal(arrays['w'], x)
  sec = header['sections'][0]
  if sparsity >= 0.5:
    head = len(zlib.compress(json.dumps(header).encode()))  # the file's compressed header
    nnz = int((x != 0).sum())  # values + a bitmap at most + header + prefix/checksum
    assert sec['codec'] == 'sparse' and size <= 4 * nnz + x.size / 8 + head + 80
  else:
    assert sec['codec'] == 'f32'


@pytest.mark.parametrize('criterion', ['magnitude', 'gmp'])
def test_pruned_run_trains_exports_sparse_and_evaluates_the_same(criterion, mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, **{'prune.criterion': criterion, 'prune.sparsity': 0.9,
                                  'prune.every': 4})
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  path = str(tmp_path / 'p.pemn')
  res = export_run(str(tmp_path / 'run'), path, params_dir=None)
  header, _, params, _ = load(path)
  k = np.asarray(params['Dense_0']['kernel'])
  assert (k != 0).mean() == pytest.approx(0.1, abs=1e-3)
  assert any(s['codec'] == 'sparse' for s in header['sections'])
  assert res['file_bytes'] < 4 * res['num_params'] * 0.25
  ev = evaluate_artifact(path, 'mnist', mnist_slice['data_dir'], mnist_slice['source_dir'])
  assert ev['accuracy'] == pytest.approx(out['test_accuracy'], abs=1e-9)


def test_order1_rans_reaches_the_conditional_entropy_of_clustered_masks():
  """``rans1`` codes a bit given the one before it (column-major): on a mask
  whose kept weights come in runs along the first axis it reaches the
  source's conditional entropy, well under order-0 rANS; any shape
  roundtrips; corrupt data is refused."""
  rng = np.random.default_rng(0)
  p1 = {0: 0.01, 1: 0.6}  # P(kept | previous kept?) along the first axis
  cols, rows = 300, 784
  m = np.zeros((rows, cols), bool)
  prev = np.zeros(cols, bool)
  for r in range(rows):
    prev = rng.random(cols) < np.where(prev, p1[1], p1[0])
    m[r] = prev
  def h(p):
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
  frac1 = p1[0] / (1 - p1[1] + p1[0])  # the chain's stationary share of ones
  cond = m.size * ((1 - frac1) * h(p1[0]) + frac1 * h(p1[1]))
  b1, b0 = codecs.encode_mask(m, 'rans1'), codecs.encode_mask(m, 'rans')
  np.testing.assert_array_equal(codecs.decode_mask(b1, 'rans1', m.shape, int(m.sum())), m)
  assert 8 * len(b1) <= 1.03 * cond + 32 * codecs.rans_streams(m.size) + 64
  assert len(b1) < 0.75 * len(b0)
  for shape in [(3, 5, 7), (2, 1), (17,)]:
    x = rng.random(shape) < 0.4
    np.testing.assert_array_equal(
        codecs.decode_mask(codecs.encode_mask(x, 'rans1'), 'rans1', shape, int(x.sum())), x)
  for bad, msg in [(b1[:-2], 'truncated|corrupt'), (b1[:40] + bytes([b1[40] ^ 8]) + b1[41:],
                                                    'corrupt|transition'),
                   (b'\x80' * 30, 'varint'), (b1[:2], 'varints|transition')]:
    with pytest.raises(ValueError, match=msg):
      codecs.decode_mask(bad, 'rans1', m.shape, int(m.sum()))
  with pytest.raises(ValueError, match='transition counts'):
    codecs.decode_mask(b1, 'rans1', m.shape, int(m.sum()) + 1)


def test_write_reports_progress_over_all_sections_and_eta_prints_only_long_tasks(tmp_path):
  rng = np.random.default_rng(0)
  mask = rng.random((30, 7)) < 0.5
  q = codecs.Quantized(mask, rng.integers(0, 2, int(mask.sum())), np.array([-1., 1.], np.float32),
                       'uniform', 1)
  arrays = {'w': rng.normal(size=(40, 3)).astype(np.float32), 'b': np.ones(5, np.float32),
            'mask/w': rng.random((40, 3)) < 0.5, 'q': q}
  calls = []
  artifact.write(str(tmp_path / 'p.pemn'), minimal_header(), arrays,
                 progress=lambda d, t: calls.append((d, t)))
  # before the first section, then after each one: 120 + 5 + 120 + 210 elements in all
  assert calls[0] == (0, 455) and calls[-1] == (455, 455) and len(calls) == 5
  assert [d for d, _ in calls] == sorted(d for d, _ in calls)
  # the printer: nothing within `every` seconds of the last line, nothing at 0 or the end
  now, lines = [100.0], []
  eta = cli.Eta(lines.append, 'encoding', ' weights', every=5.0, clock=lambda: now[0])
  for t, done in [(200.0, 0), (203.0, 10), (206.0, 25), (208.0, 50), (212.0, 100)]:
    now[0] = t
    eta(done, 100)
  # the clock restarted at done=0 (t=200): at t=206, 6 s for 25% -> 18 s left
  assert lines == ['encoding: 25/100 weights (25%), 6s, eta 18s']


def _grid_cases():
  rng = np.random.default_rng(1)
  sparse = rng.normal(size=(60, 50))
  sparse[rng.random(sparse.shape) < 0.9] = 0
  return {'normal': rng.normal(size=(3000,)) * 0.05, 'sparse': sparse,
          'positive': rng.uniform(0.5, 3.0, size=(64,)), 'constant': np.full((7, 3), -1.25),
          'zeros': np.zeros((16,)), 'empty': np.zeros((0, 4)), 'one': np.array([3e-8]),
          'outlier': np.concatenate([rng.normal(size=2000) * 0.01, [5.0]])}


@pytest.mark.parametrize('bits', [2, 4, 8, 16])
@pytest.mark.parametrize('case', sorted(_grid_cases()))
def test_grid_sections_roundtrip_exactly_and_bound_the_error(case, bits, tmp_path):
  x = _grid_cases()[case].astype(np.float32)
  g = codecs.Grid.of(x, bits)
  path = str(tmp_path / 'g.pemn')
  artifact.write(path, minimal_header(), {'params/w': g, 'params/b': x})
  header, arrays = artifact.read(path)
  got = arrays['params/w']
  np.testing.assert_array_equal(got, g.dense())  # the file holds exactly the grid
  sec = next(s for s in header['sections'] if s['name'] == 'params/w')
  assert sec['codec'] == 'grid' and got.shape == x.shape
  if not x.size:
    return
  top = 2 ** (bits - 1) - 1
  peak = float(np.abs(x).max())
  step = peak / top
  # Every value moves by at most half a step (+ float32 rounding of the step
  # and of the value), zeros stay zeros, and values take at most 2^bits - 1
  # distinct levels k * step, |k| <= top.
  assert np.abs(got.astype(np.float64) - x).max() <= step / 2 * (1 + 1e-6) + 1e-7 * peak
  assert (got[x == 0] == 0).all()
  if step:
    k = got.astype(np.float64) / step
    np.testing.assert_allclose(k, np.round(k), atol=1e-3 * max(1, top / 1000))
    assert np.abs(np.round(k)).max() <= top
  assert len(np.unique(got)) <= 2 ** bits - 1
  # No more than the levels' fixed width (+ its step and 3 varints); for a
  # large array the entropy-coded form comes within its table of H(levels).
  levels = np.round(got.astype(np.float64) / step).astype(np.int64) if step else np.zeros(x.size)
  span = int(levels.max() - levels.min()) + 1
  width = (span - 1).bit_length()
  assert sec['length'] <= 4 + 9 + (x.size * width + 7) // 8
  if x.size >= 2000 and bits == 8:
    p = np.unique(levels, return_counts=True)[1] / levels.size
    entropy_bytes = -(p * np.log2(p)).sum() * levels.size / 8
    assert sec['length'] <= entropy_bytes * 1.01 + 3 * span + 64


def test_grid_export_is_smaller_and_holds_the_params_it_rebuilds(trained, tmp_path):
  """``export --float_bits``: every float section on a grid, masks as before;
  the dense-params checkpoint holds what the file rebuilds (not the run's
  unrounded params), and the accuracy moves little at 8 bits."""
  wd, out, mnist_slice = trained
  f32, g8 = str(tmp_path / 'a.pemn'), str(tmp_path / 'b.pemn')
  export_run(str(wd), f32, params_dir=None)
  res = export_run(str(wd), g8, params_dir=str(tmp_path / 'params'), float_bits=8)
  h32, a32 = artifact.read(f32)
  h8, a8 = artifact.read(g8)
  assert res['file_bytes'] < os.path.getsize(f32)
  for s in h8['sections']:
    name = s['name']
    if sections.is_mask(name):
      assert s['codec'] in codecs.MASK_CODECS
      np.testing.assert_array_equal(a8[name], a32[name])
    else:
      assert s['codec'] == 'grid', name
      x = a32[name].astype(np.float64)  # the unrounded values: within half a step
      assert np.abs(a8[name] - x).max() <= np.abs(x).max() / 127 / 2 * (1 + 1e-6) + 1e-12
  _, _, params, model_state = load(g8)
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / 'params'))
  assert tree_equal(restored['params'], params)
  assert tree_equal({k: v for k, v in restored.items() if k != 'params'}, model_state)
  ev = evaluate_artifact(g8, 'mnist', mnist_slice['data_dir'], mnist_slice['source_dir'])
  assert ev['accuracy'] == pytest.approx(out['test_accuracy'], abs=0.02)


def test_quiet_by_default_library_logs_with_verbosity(trained, tmp_path, mnist_slice, capfd):
  """The CLIs print our lines, not the libraries' INFO logs (orbax writes
  several per checkpoint read), unless --verbosity=0; preparing a local
  dataset says so in one line of ours, not TFDS's "Downloading and
  preparing" (nothing is downloaded)."""
  import re

  from pemn_jax.data import sources
  wd = trained[0]
  info = re.compile(r'^I\d{4} ', re.M)  # absl's INFO line prefix (I<month><day> ...)
  runs = {}
  for extra in ([], ['--verbosity=0']):
    p = subprocess.run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={wd}',
                        f'--out={tmp_path / "q.pemn"}', '--params_dir=', *extra], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    runs[bool(extra)] = p.stdout + p.stderr
  assert not info.search(runs[False]), runs[False]
  assert len(info.findall(runs[True])) >= 2  # (the check can see them)
  capfd.readouterr()
  sources.load('mnist', 'test', str(tmp_path / 'fresh_tfds'), mnist_slice['source_dir'])
  out, err = capfd.readouterr()
  assert 'prepared once into' in out and 'Downloading' not in out + err, out + err
