"""What a model file's header may hold, checked before anything is built.

A file from an untrusted source is parsed as JSON and checked field by field
here: known keys only, types, ranges, bounded sizes and nesting. Nothing in
it is executed, imported or compiled (a leaf selection in a file is a named
selection or a list of leaf paths, never a regular expression).
"""

from __future__ import annotations

import math
from typing import Any

from pemn_jax.export import codecs

MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_SECTIONS = 100_000
MAX_STR = 256
MAX_LIST = 4096
MAX_INT = 1 << 16          # model_kwargs integers (widths, depths, ...)
MAX_ELEMENTS = 1 << 31     # any one section

FLOAT_CODECS = tuple(codecs.FLOAT_CODECS)
MASK_CODECS = codecs.MASK_CODECS
INDEX_CODECS = (*MASK_CODECS, 'u32')
QUANT_METHODS = codecs.QUANT_METHODS
TOP_LEVEL = {
    'format': str, 'pemn_jax_version': str, 'jax_version': str, 'model': str,
    'model_kwargs': dict, 'num_classes': int, 'input_shape': list, 'param': dict, 'seed': int,
    'dataset': str, 'step': int, 'sections': list,
}


class SchemaError(ValueError):
  """A header field with a wrong type, range or name (the message names it)."""


def depth(x, limit: int = MAX_DEPTH) -> int:
  """Nesting depth of a JSON value (stops counting past ``limit``)."""
  stack, deepest = [(x, 1)], 0
  while stack:
    v, d = stack.pop()
    deepest = max(deepest, d)
    if deepest > limit:
      return deepest
    if isinstance(v, dict):
      stack.extend((c, d + 1) for c in v.values())
    elif isinstance(v, list):
      stack.extend((c, d + 1) for c in v)
  return deepest


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _need(ok: bool, where: str, what: str, value: Any):
  if not ok:
    shown = repr(value)
    raise SchemaError(f'header field {where}: {what} (got {shown[:80]}'
                      f'{"..." if len(shown) > 80 else ""})')


def _scalar(where: str, v):
  if isinstance(v, str):
    _need(len(v) <= MAX_STR, where, f'a string of <= {MAX_STR} characters', v)
  elif _int(v):
    _need(-MAX_INT <= v <= MAX_INT, where, f'an integer in [-{MAX_INT}, {MAX_INT}]', v)
  elif isinstance(v, float):
    _need(math.isfinite(v), where, 'a finite number', v)
  else:
    _need(v is None or isinstance(v, bool), where, 'a JSON scalar', v)


def check_model_kwargs(kwargs: dict):
  _need(len(kwargs) <= 64, 'model_kwargs', 'at most 64 keys', kwargs)
  for k, v in kwargs.items():
    _need(len(k) <= 64 and k.isidentifier(), f'model_kwargs.{k[:64]}', 'an identifier key', k)
    if isinstance(v, list):
      _need(len(v) <= 256, f'model_kwargs.{k}', 'a list of <= 256 items', v)
      for i, x in enumerate(v):
        _scalar(f'model_kwargs.{k}[{i}]', x)
    else:
      _scalar(f'model_kwargs.{k}', v)


def check_param(spec: dict, where: str = 'param', level: int = 0):
  """A parameterization spec: a name, JSON scalars, a ``select`` that is a
  named selection or a list of leaf paths, and at most one nested ``source``."""
  _need(level < 8, where, 'at most 8 nested sources', spec)
  _need(isinstance(spec.get('name'), str), f'{where}.name', 'a string', spec.get('name'))
  _need(len(spec) <= 32, where, 'at most 32 options', spec)
  for k, v in spec.items():
    w = f'{where}.{k}'
    _need(isinstance(k, str) and len(k) <= 64, w, 'a short string key', k)
    if k == 'source':
      _need(isinstance(v, dict), w, 'a parameterization spec', v)
      check_param(v, w, level + 1)
    elif k == 'select':
      if isinstance(v, str):
        _need(v.startswith('@'), w, 'a named selection or a list of leaf paths (regular '
              'expressions are not read from model files)', v)
      else:
        _need(isinstance(v, list) and len(v) <= MAX_LIST
              and all(isinstance(p, str) and len(p) <= 1024 for p in v), w,
              f'a list of <= {MAX_LIST} leaf paths', v)
    else:
      _scalar(w, v)


def check_section(i: int, s, body_len: int):
  w = f'sections[{i}]'
  _need(isinstance(s, dict), w, 'an object', s)
  for k in ('name', 'codec', 'shape', 'offset', 'length'):
    _need(k in s, f'{w}.{k}', 'present', None)
  _need(isinstance(s['name'], str) and 0 < len(s['name']) <= 1024, f'{w}.name', 'a path', s['name'])
  shape = s['shape']
  _need(isinstance(shape, list) and len(shape) <= 8 and all(_int(d) and 0 <= d <= MAX_ELEMENTS
                                                            for d in shape),
        f'{w}.shape', 'a list of <= 8 non-negative integers', shape)
  n = math.prod(shape)
  _need(n <= MAX_ELEMENTS, f'{w}.shape', f'at most {MAX_ELEMENTS} elements', shape)
  for k in ('offset', 'length'):
    _need(_int(s[k]) and 0 <= s[k] <= body_len, f'{w}.{k}', f'an integer in [0, {body_len}]',
          s[k])
  _need(s['offset'] + s['length'] <= body_len, w, 'inside the file', (s['offset'], s['length']))
  codec = s['codec']
  known = {'name', 'codec', 'shape', 'offset', 'length'}
  if codec in MASK_CODECS:
    known |= {'ones'}
    _need(_int(s.get('ones')) and 0 <= s['ones'] <= n, f'{w}.ones', f'an integer in [0, {n}]',
          s.get('ones'))
  elif codec == 'quant':
    known |= {'index', 'index_length', 'nnz', 'levels', 'bits', 'method', 'symbols_length'}
    _need(s.get('index') in INDEX_CODECS, f'{w}.index', f'one of {INDEX_CODECS}', s.get('index'))
    _need(_int(s.get('nnz')) and 0 <= s['nnz'] <= n, f'{w}.nnz', f'an integer in [0, {n}]',
          s.get('nnz'))
    _need(_int(s.get('bits')) and 1 <= s['bits'] <= 8, f'{w}.bits', 'an integer in [1, 8]',
          s.get('bits'))
    _need(_int(s.get('levels')) and 1 <= s['levels'] <= 2 ** s['bits'], f'{w}.levels',
          'an integer in [1, 2**bits]', s.get('levels'))
    _need(s.get('method') in QUANT_METHODS, f'{w}.method', f'one of {QUANT_METHODS}',
          s.get('method'))
    for k in ('index_length', 'symbols_length'):
      _need(_int(s.get(k)) and s[k] >= 0, f'{w}.{k}', 'an integer >= 0', s.get(k))
    counts = s['length'] - s['index_length'] - 4 * s['levels'] - s['symbols_length']
    _need(s['levels'] <= counts <= 5 * s['levels'], w,  # (counts: 1-5 byte varints)
          'parts that add up to its length', s['length'])
  elif codec == 'sparse':
    known |= {'values_codec', 'index', 'nnz', 'index_length'}
    _need(s.get('values_codec') in FLOAT_CODECS, f'{w}.values_codec', f'one of {FLOAT_CODECS}',
          s.get('values_codec'))
    _need(s.get('index') in INDEX_CODECS, f'{w}.index', f'one of {INDEX_CODECS}', s.get('index'))
    _need(_int(s.get('nnz')) and 0 <= s['nnz'] <= n, f'{w}.nnz', f'an integer in [0, {n}]',
          s.get('nnz'))
    _need(_int(s.get('index_length')) and 0 <= s['index_length'] <= s['length'],
          f'{w}.index_length', f'an integer in [0, {s["length"]}]', s.get('index_length'))
  elif codec != 'grid':  # (a grid's bytes describe themselves: codecs.decode_grid)
    _need(codec in FLOAT_CODECS, f'{w}.codec',
          f'one of {FLOAT_CODECS + MASK_CODECS}, sparse, quant or grid', codec)
  extra = set(s) - known
  _need(not extra, w, f'only the fields {sorted(known)}', sorted(extra))


def check_header(header, body_len: int):
  """Raises SchemaError naming the first field that is not as a model file's."""
  _need(isinstance(header, dict), 'header', 'a JSON object', header)
  _need(depth(header) <= MAX_DEPTH, 'header', f'at most {MAX_DEPTH} levels of nesting', '...')
  for k, kind in TOP_LEVEL.items():
    _need(k in header, k, 'present', None)
    v = header[k]
    _need(isinstance(v, kind) and not isinstance(v, bool), k, f'a {kind.__name__}', v)
  extra = set(header) - set(TOP_LEVEL)
  _need(not extra, 'header', f'only the fields {sorted(TOP_LEVEL)}', sorted(extra))
  _need(header['format'] == 'pemn_jax model', 'format', "'pemn_jax model'", header['format'])
  for k in ('pemn_jax_version', 'jax_version', 'model', 'dataset'):
    _need(len(header[k]) <= MAX_STR, k, f'a string of <= {MAX_STR} characters', header[k])
  _need(1 <= header['num_classes'] <= 1_000_000, 'num_classes', 'an integer in [1, 1e6]',
        header['num_classes'])
  shape = header['input_shape']
  _need(1 <= len(shape) <= 4 and all(_int(d) and 1 <= d <= 8192 for d in shape), 'input_shape',
        '1 to 4 integers in [1, 8192]', shape)
  _need(0 <= header['seed'] < 2**32, 'seed', 'an integer in [0, 2**32)', header['seed'])
  _need(header['step'] >= 0, 'step', 'an integer >= 0', header['step'])
  check_model_kwargs(header['model_kwargs'])
  check_param(header['param'])
  sections = header['sections']
  _need(len(sections) <= MAX_SECTIONS, 'sections', f'at most {MAX_SECTIONS}', len(sections))
  names = set()
  for i, s in enumerate(sections):
    check_section(i, s, body_len)
    _need(s['name'] not in names, f'sections[{i}].name', 'unique', s['name'])
    names.add(s['name'])
