"""Model files from untrusted sources: crafted headers and sections (each with
a *valid* checksum) load correctly or fail with the library's ArtifactError,
quickly and without allocating more than the model needs; plus a fuzz test."""

import hashlib
import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pemn_jax.export import artifact
from pemn_jax.export.model_file import export_run, load
from pemn_jax.train.loop import train_and_evaluate

PREFIX = struct.Struct('<8sII')
SPEC = {'name': 'masked', 'keep': 0.2,
        'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 0.05}}


@pytest.fixture(scope='module')
def good_file(mnist_slice, tmp_path_factory):
  wd = tmp_path_factory.mktemp('run')
  c = tiny_config(mnist_slice, param=SPEC, num_steps=4, **{'optimizer.lr': 0.05})
  train_and_evaluate(c, str(wd))
  path = str(wd / 'good.pemn')
  export_run(str(wd), path, params_dir=None)
  export_run(str(wd), str(wd / 'good_grid.pemn'), params_dir=None, float_bits=6)
  return path


def _grid_twin(good_file):
  """The same run exported with its floats on a grid (``grid`` sections)."""
  return good_file.replace('good.pemn', 'good_grid.pemn')


def split(data: bytes):
  _, version, head_len = PREFIX.unpack_from(data)
  header = json.loads(zlib.decompress(data[PREFIX.size:PREFIX.size + head_len]))
  return version, header, data[PREFIX.size + head_len:-32]


def join(header, sections: bytes, version=artifact.FORMAT_VERSION, raw_header=None) -> bytes:
  head = zlib.compress(raw_header if raw_header is not None else json.dumps(header).encode())
  body = PREFIX.pack(artifact.MAGIC, version, len(head)) + head + sections
  return body + hashlib.sha256(body).digest()  # a valid checksum: only content checks can refuse


def craft(good_file, tmp_path, edit=None, sections_edit=None, raw_header=None, name='x'):
  _, header, sections = split(open(good_file, 'rb').read())
  if edit:
    edit(header)
  if sections_edit:
    sections = sections_edit(header, sections)
  path = tmp_path / f'{name}.pemn'
  path.write_bytes(join(header, sections, raw_header=raw_header))
  return str(path)


def section(header, prefix):
  return next(s for s in header['sections'] if s['name'].startswith(prefix))


def set_key(path, value):
  def edit(h):
    node = h
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = value
  return edit


def test_the_good_file_loads(good_file):
  header, _, params, _ = load(good_file)
  assert any(s['codec'] == 'rans' for s in header['sections'])  # keep=0.2 masks: entropy-coded
  assert isinstance(header['param']['select'], list)  # selections stored as leaf paths


CRAFTED = {
    # name: (edit of the header, expected message)
    'huge_mask': (lambda h: section(h, 'mask/').update(shape=[1_000_000_000], ones=1),
                  'model needs'),
    'regex_select': (set_key(['param', 'select'], '(a+)+$'), 'regular expressions are not read'),
    'regex_in_source': (set_key(['param', 'source', 'select'], '.*kernel'), 'not read'),
    'huge_kwargs': (set_key(['model_kwargs', 'hidden'], [65536, 65536, 65536]), 'max_params'),
    'too_big_int': (set_key(['model_kwargs', 'hidden'], [10**9]), 'model_kwargs.hidden'),
    'short_prototype': (lambda h: section(h, 'source/prototype').update(
        shape=[section(h, 'source/prototype')['shape'][0] - 5]), 'model needs'),
    'mask_of_one': (lambda h: section(h, 'mask/').update(shape=[1], ones=1), 'model needs'),
    'negative_offset': (lambda h: section(h, 'mask/').update(offset=-40), 'offset'),
    'offset_past_end': (lambda h: section(h, 'mask/').update(offset=10**9), 'offset'),
    'override_params': (lambda h: h['sections'].append(dict(
        section(h, 'source/prototype'), name='model_state/params/Dense_0/kernel')),
        'unexpected'),
    'unknown_model': (set_key(['model'], 'os.system'), 'not a registry model'),
    'unknown_param': (set_key(['param', 'name'], 'evil'), 'unknown parameterization'),
    'bad_option': (set_key(['param', 'keep'], 'all'), 'rebuild the model'),
    'nan_keep': (set_key(['param', 'keep'], float('nan')), 'NaN is not a JSON number'),
    'seed_too_big': (set_key(['seed'], 2**40), 'seed'),
    'bool_step': (set_key(['step'], True), 'step'),
    'extra_field': (set_key(['exec'], 'rm -rf /'), 'only the fields'),
    'missing_field': (lambda h: h.pop('param'), 'param'),
    'float_as_mask': (lambda h: section(h, 'source/prototype').update(codec='bits', ones=1),
                      'model needs'),
    'bad_codec': (lambda h: section(h, 'mask/').update(codec='zip'), 'codec'),
    'ones_out_of_range': (lambda h: section(h, 'mask/').update(ones=-1), 'ones'),
    'duplicate_section': (lambda h: h['sections'].append(dict(h['sections'][0])), 'unique'),
    'input_shape': (set_key(['input_shape'], [28, 28, 1, 1, 1]), 'input_shape'),
    'num_classes': (set_key(['num_classes'], 0), 'num_classes'),
    'wrong_input_shape': (set_key(['input_shape'], [27, 28, 1]), 'model needs'),
}


@pytest.mark.parametrize('case', sorted(CRAFTED))
def test_crafted_headers_are_refused_with_the_library_error(case, good_file, tmp_path):
  edit, msg = CRAFTED[case]
  path = craft(good_file, tmp_path, edit=edit, name=case)
  t0 = time.time()
  with pytest.raises(artifact.ArtifactError, match=msg):
    load(path)
  assert time.time() - t0 < 10


def test_crafted_raw_headers_and_section_bytes(good_file, tmp_path):
  cases = {
      'deep': (b'[' * 100_000 + b']' * 100_000, 'header'),
      'not_json': (b'{"format": "pemn_jax model", ', 'unreadable header'),
      'not_utf8': (b'\xff\xfe\x00', 'unreadable header'),
      'array': (b'[1, 2, 3]', 'JSON object'),
  }
  for name, (raw, msg) in cases.items():
    path = craft(good_file, tmp_path, raw_header=raw, name=name)
    with pytest.raises(artifact.ArtifactError, match=msg):
      load(path)

  def nan_prototype(header, sections):
    s = section(header, 'source/prototype')
    assert s['codec'] == 'f32'
    nan = np.full(s['length'] // 4, np.nan, '<f4').tobytes()
    return sections[:s['offset']] + nan + sections[s['offset'] + s['length']:]
  with pytest.raises(artifact.ArtifactError, match='non-finite'):
    load(craft(good_file, tmp_path, sections_edit=nan_prototype, name='nan'))

  def flip_mask(header, sections):
    s = section(header, 'mask/')
    i = s['offset'] + s['length'] // 2
    return sections[:i] + bytes([sections[i] ^ 0x10]) + sections[i + 1:]
  with pytest.raises(artifact.ArtifactError, match='mask'):
    load(craft(good_file, tmp_path, sections_edit=flip_mask, name='flip'))


def test_the_cli_exits_2_on_a_crafted_file(good_file, tmp_path):
  path = craft(good_file, tmp_path, edit=CRAFTED['regex_select'][0], name='cli')
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.evaluate', '--artifact', path], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and 'regular expressions' in p.stderr and 'Traceback' not in p.stderr


# --- Fuzzing: random header values and section bytes, valid checksums ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.sampled_from(['(a+)+$', '@stages', 'mlp', 'rans', 'bits', 'f32']),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=8)


def _paths(x, prefix=()):
  yield prefix
  if isinstance(x, dict):
    for k, v in x.items():
      yield from _paths(v, prefix + (k,))
  elif isinstance(x, list):
    for i, v in enumerate(x):
      yield from _paths(v, prefix + (i,))


EXAMPLES = int(os.environ.get('PEMN_FUZZ_EXAMPLES', '60'))
FUZZ_COUNTS = {'tried': 0, 'refused': 0, 'loaded': 0}  # printed with PEMN_FUZZ_REPORT=1 -s


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_model_files(good_file, tmp_path_factory, data):
  good_file = data.draw(st.sampled_from([good_file, _grid_twin(good_file)]))
  version, header, sections = split(open(good_file, 'rb').read())
  kind = data.draw(st.sampled_from(['value', 'delete', 'bytes']))
  if kind == 'bytes':
    n = data.draw(st.integers(1, 8))
    body = bytearray(sections)
    for _ in range(n):
      i = data.draw(st.integers(0, len(body) - 1))
      body[i] = data.draw(st.integers(0, 255))
    sections = bytes(body)
  else:
    paths = [p for p in _paths(header) if p]
    path = data.draw(st.sampled_from(paths))
    node = header
    for k in path[:-1]:
      node = node[k]
    if kind == 'delete':
      del node[path[-1]]
    else:
      node[path[-1]] = data.draw(json_values)
  tmp = tmp_path_factory.mktemp('fuzz')
  file = tmp / 'f.pemn'
  file.write_bytes(join(header, sections, version))
  FUZZ_COUNTS['tried'] += 1
  t0 = time.time()
  try:
    _, _, params, model_state = load(str(file))
  except artifact.ArtifactError:
    FUZZ_COUNTS['refused'] += 1
  else:  # a correct load: the model's shapes, finite values
    FUZZ_COUNTS['loaded'] += 1
    good = load(good_file)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good[2]), strict=True):
      assert a.shape == b.shape and bool(np.isfinite(np.asarray(a)).all())
  assert time.time() - t0 < 30
  # No load allocates more than a small model needs (the worker's peak RSS).
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 6 * 2**20  # KiB: 6 GiB
  if os.environ.get('PEMN_FUZZ_REPORT'):
    print(f'fuzz counts: {FUZZ_COUNTS}', flush=True)



def test_crafted_quant_sections_are_refused(tmp_path):
  from conftest import minimal_header

  from pemn_jax.export import codecs
  rng = np.random.default_rng(0)
  w = rng.normal(size=(20, 10)).astype(np.float32)
  w[rng.random(w.shape) < 0.7] = 0
  mask = w != 0
  codebook = np.linspace(-2, 2, 8).astype(np.float32)
  q = codecs.Quantized(mask, rng.integers(0, 8, int(mask.sum())), codebook, 'uniform', 3)
  good = str(tmp_path / 'q.pemn')
  artifact.write(good, minimal_header(), {'params/w': q})
  assert np.array_equal(artifact.read(good)[1]['params/w'], q.dense())
  sec = lambda h: h['sections'][0]  # noqa: E731
  cases = {
      'levels': (lambda h: sec(h).update(levels=16), 'levels'),
      'bits': (lambda h: sec(h).update(bits=9), 'bits'),
      'method': (lambda h: sec(h).update(method='pca'), 'method'),
      'lengths': (lambda h: sec(h).update(symbols_length=sec(h)['symbols_length'] + 1),
                  'add up'),
      'nnz': (lambda h: sec(h).update(nnz=sec(h)['nnz'] - 1), 'section'),
  }
  for name, (edit, msg) in cases.items():
    path = craft(good, tmp_path, edit=edit, name=name)
    with pytest.raises(artifact.ArtifactError, match=msg):
      artifact.read(path)

  def nan_codebook(header, sections):
    s = sec(header)
    i = s['offset'] + s['index_length']
    return sections[:i] + np.full(1, np.nan, '<f4').tobytes() + sections[i + 4:]
  with pytest.raises(artifact.ArtifactError, match='non-finite'):
    artifact.read(craft(good, tmp_path, sections_edit=nan_codebook, name='nan'))

  def counts_edit(byte):
    def edit(header, sections):
      s = sec(header)
      i = s['offset'] + s['index_length'] + 4 * s['levels']  # the first count's varint
      return sections[:i] + bytes([byte(sections[i])]) + sections[i + 1:]
    return edit
  for name, byte, msg in [('count_continues', lambda b: b | 0x80, 'varints'),
                          ('count_off', lambda b: b ^ 1, 'counts sum')]:
    with pytest.raises(artifact.ArtifactError, match=msg):
      artifact.read(craft(good, tmp_path, sections_edit=counts_edit(byte), name=name))


# --- Cost: a few hundred bytes must not make a loader build a huge model ---

# One generated header (no section data) per resource axis: what each declares
# costs gigabytes or hours to build; each must be refused, by the limit named,
# before anything is allocated.
RESOURCE_AXES = {
    'width': ({'model': 'mlp', 'model_kwargs': {'hidden': [65536, 65536]}}, 'max_params'),
    'depth': ({'model': 'vit', 'model_kwargs': {'depth': 65536}, 'input_shape': [32, 32, 3]},
              'max_module_calls'),
    'classes': ({'model': 'mlp', 'num_classes': 1_000_000}, 'max_example_bytes'),
    'input_size': ({'model': 'convmixer', 'input_shape': [8192, 8192, 3]}, 'max_example_bytes'),
    # NNX models are not call-counted while traced: their depth is fixed by
    # the registry (a depth in the file does not reach them), their width is not
    'nnx_width': ({'model': 'resnet20_nnx', 'model_kwargs': {'width': 65536},
                   'input_shape': [32, 32, 3]}, 'max_params'),
    'nnx_depth': ({'model': 'resnet20_nnx', 'model_kwargs': {'depth': 65536},
                   'input_shape': [32, 32, 3]}, "multiple values for argument 'depth'"),
    'mask_length': ({'param': {'name': 'masked', 'keep': 0.5},
                     'sections': [{'name': 'mask/params/Dense_0/kernel', 'codec': 'bits',
                                   'shape': [2**31], 'offset': 0, 'length': 0, 'ones': 1}]},
                    'model needs|elements'),
}

_UNDER_LIMIT = '''
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # 3 GiB of address space
from pemn_jax.export import artifact
from pemn_jax.export.model_file import load
for path in sys.argv[1:]:
  t0 = time.time()
  try:
    load(path)
    print('LOADED', path, flush=True)
  except artifact.ArtifactError as e:
    print(f'REFUSED {time.time() - t0:.1f}s', e, flush=True)
'''


def test_each_resource_axis_is_refused_quickly_under_a_memory_limit(tmp_path):
  from conftest import minimal_header
  paths = []
  for name, (fields, _) in RESOURCE_AXES.items():
    header = {**minimal_header(), **{k: v for k, v in fields.items() if k != 'sections'}}
    path = tmp_path / f'{name}.pemn'
    raw = zlib.compress(json.dumps({**header, 'sections': fields.get('sections', [])}).encode())
    body = PREFIX.pack(artifact.MAGIC, artifact.FORMAT_VERSION, len(raw)) + raw
    path.write_bytes(body + hashlib.sha256(body).digest())
    assert path.stat().st_size < 700  # a tiny file
    paths.append(str(path))
  p = subprocess.run([sys.executable, '-c', _UNDER_LIMIT, *paths], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith(('REFUSED', 'LOADED'))]
  assert p.returncode == 0 and len(lines) == len(RESOURCE_AXES), p.stdout + p.stderr[-3000:]
  for (name, (_, limit)), line in zip(RESOURCE_AXES.items(), lines, strict=True):
    assert line.startswith('REFUSED'), (name, line)
    assert re.search(limit, line), (name, line)
    assert float(line.split()[1][:-1]) < 30, (name, line)  # seconds


def test_strict_header_json(good_file, tmp_path):
  _, header, _ = split(open(good_file, 'rb').read())
  text = json.dumps(header)
  cases = {
      # a second "seed" would silently win in json.loads
      'duplicate_key': ((text[:-1] + ', "seed": 7}').encode(), 'appears twice'),
      'utf16': text.encode('utf-16'), 'bom': b'\xef\xbb\xbf' + text.encode(),
      'nan_constant': text.replace('"seed": ', '"seed": NaN, "x": ').encode(),
  }
  cases = {k: (v if isinstance(v, tuple) else (v, 'unreadable header')) for k, v in cases.items()}
  for name, (raw, msg) in cases.items():
    path = craft(good_file, tmp_path, raw_header=raw, name=name)
    with pytest.raises(artifact.ArtifactError, match=msg):
      load(path)


def test_params_rebuilt_non_finite_are_refused(good_file, tmp_path):
  """Finite sections and header values whose rebuilt params are not (a
  prototype of float32's largest values, times a huge ``gain``'s std)."""
  def huge_prototype(header, sections):
    s = section(header, 'source/prototype')
    big = np.full(s['length'] // 4, 3.4e38, '<f4').tobytes()
    return sections[:s['offset']] + big + sections[s['offset'] + s['length']:]
  path = craft(good_file, tmp_path, edit=set_key(['param', 'source', 'gain'], 1e30),
               sections_edit=huge_prototype, name='huge')
  with pytest.raises(artifact.ArtifactError, match='not finite'):
    load(path)


def test_compressed_header_bounds_and_format_2(good_file, tmp_path):
  """Format 3's zlib header: a bomb past the header limit, bytes that are not
  zlib, a truncated stream and trailing bytes are refused; a format-2 file
  (plain JSON header) is refused with what to do."""
  version, header, sections = split(open(good_file, 'rb').read())
  assert version == 3
  text = json.dumps(header).encode()
  bomb = zlib.compress(text[:-1] + b', "x": "' + b' ' * (2 << 20) + b'"}', 9)
  assert len(bomb) < 8 << 10  # a few KB that would inflate past 2 MiB
  cases = {'bomb': (bomb, 'more than'), 'not_zlib': (text, 'not zlib'),
           'cut': (zlib.compress(text)[:-6], 'incomplete'),
           'trailing': (zlib.compress(text) + b'\0', 'followed by other bytes')}
  for name, (raw, msg) in cases.items():
    body = PREFIX.pack(artifact.MAGIC, 3, len(raw)) + raw + sections
    path = tmp_path / f'{name}.pemn'
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(artifact.ArtifactError, match=msg):
      load(str(path))
  body = PREFIX.pack(artifact.MAGIC, 2, len(text)) + text + sections
  old = tmp_path / 'format2.pemn'
  old.write_bytes(body + hashlib.sha256(body).digest())
  with pytest.raises(artifact.ArtifactError, match='format version 2.*re-export it from its run'):
    load(str(old))


def test_crafted_grid_sections_are_refused(tmp_path):
  """A ``grid`` section's bytes: float32 step, zigzag varint of the lowest
  level, varint number of levels, coding (0 bit-packed, 1 counts + rANS), the
  levels. Each field out of its range is refused by name."""
  from conftest import minimal_header

  from pemn_jax.export import codecs
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 50)).astype(np.float32)
  good = str(tmp_path / 'g.pemn')
  g = codecs.Grid.of(x, 6)
  artifact.write(good, minimal_header(), {'params/w': g})
  header, arrays = artifact.read(good)
  assert np.array_equal(arrays['params/w'], g.dense())
  levels = g.levels.reshape(-1)
  low, span = int(levels.min()), int(levels.max() - levels.min()) + 1
  counts = np.bincount(levels - low, minlength=span)
  rans = codecs.encode_varints(counts) + codecs.rans_encode_symbols(levels - low, counts)
  width = (span - 1).bit_length()
  packed = np.packbits(((levels - low)[:, None] >> np.arange(width)) & 1, bitorder='little')

  def blob(step=g.step, zig=2 * -low - 1, span=span, coding=1, payload=rans):
    return (np.float32(step).astype('<f4').tobytes() + codecs.encode_varints([zig, span, coding])
            + bytes(payload))
  assert header['sections'][0]['length'] == len(blob())  # the layout as documented

  def replace(data):
    def edit(h):
      h['sections'][0]['length'] = len(data)
    return edit, lambda h, sections: data
  packed_ok = blob(coding=0, payload=packed)
  cases = {
      'packed_ok': (packed_ok, None),
      'nan_step': (blob(step=np.nan), 'not a finite number'),
      'negative_step': (blob(step=-1.0), 'not a finite number'),
      'short': (b'\x00\x00', 'shorter than its step'),
      'no_varints': (blob()[:5], 'do not hold 3 varints'),
      'low': (blob(zig=2 * 40000), 'outside'),
      'span_zero': (blob(span=0), 'outside'),
      'span_past_top': (blob(span=40000), 'outside'),
      'coding': (blob(coding=7), 'unknown grid coding'),
      'packed_length': (blob(coding=0, payload=packed[:-1]), 'bit-packed grid has'),
      'packed_beyond_span': (blob(coding=0, span=span - 1,
                                  payload=packed), 'outside its span|bit-packed grid has'),
      'counts_sum': (blob(payload=codecs.encode_varints(counts + 1) + rans[span:]), 'counts sum'),
      'rans_corrupt': (blob()[:-2] + b'\xff\xff', 'corrupt|truncated|counts'),
      'rans_span': (blob(span=5000), 'at most 4096'),
  }
  for name, (data, msg) in cases.items():
    edit, sections_edit = replace(data)
    path = craft(good, tmp_path, edit=edit, sections_edit=sections_edit, name=name)
    if msg is None:
      np.testing.assert_array_equal(artifact.read(path)[1]['params/w'], g.dense())
      continue
    with pytest.raises(artifact.ArtifactError, match=msg):
      artifact.read(path)
