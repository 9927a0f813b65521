"""The ``.pemn`` model file: self-contained, checksummed, no pickle.

Layout::

    b'PEMNJAX\\0'  u32 format version  u32 header length  header
    section bytes ...                  sha256 of everything before (32 bytes)

The header is compact UTF-8 JSON, zlib-compressed.

The header holds the model and parameterization config, the seed and a table
of sections (name, codec, shape, offset, length); sections are float arrays
(f32/f16/bf16; sparse: nonzeros + positions; quantized: a codebook, or a
uniform grid, with entropy-coded symbols) or boolean masks (bit-packed or
rANS-coded). Reading checks, in order: magic, version, checksum, the
header's size, JSON and schema (``schema.check_header``), and -- when the
caller passes the sections the model needs -- every section's name, shape and
kind before decoding it, so a crafted file can neither allocate more than the
model needs nor place values where the model does not read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import zlib

import numpy as np

from pemn_jax.export import codecs, schema
from pemn_jax.params.sections import is_mask

MAGIC = b'PEMNJAX\x00'
# 3: zlib-compressed header, 16,384-symbol rANS streams, varint symbol counts;
# 2: rANS masks; 1: arithmetic-coded masks. Only the current one is read.
FORMAT_VERSION = 3
_PREFIX = struct.Struct('<8sII')


class ArtifactError(ValueError):
  """A model file that cannot be read (truncated, corrupt, other version)."""


def _encode_float_section(x, float_codec):
  """Dense floats, or -- when smaller -- the nonzeros plus their positions as a
  bitmap (bit-packed or rANS-coded) or as uint32 indices."""
  dense = codecs.encode_floats(x, float_codec)
  nz = np.asarray(x) != 0
  nnz = int(nz.sum())
  if nnz == nz.size or x.size < 64:
    return float_codec, dense, {}
  values = codecs.encode_floats(np.asarray(x)[nz], float_codec)
  kind, index = _encode_positions(nz)
  if len(index) + len(values) >= len(dense):
    return float_codec, dense, {}
  return 'sparse', index + values, {'values_codec': float_codec, 'index': kind, 'nnz': nnz,
                                    'index_length': len(index)}


def _encode_positions(nz: np.ndarray, candidates=codecs.MASK_CODECS,
                      indices: bool = True) -> tuple[str, bytes]:
  """The smallest code of a 0/1 array (its shape kept: ``rans1`` reads it
  column-major) among the mask codecs ``candidates`` (bitmap, rANS bitmaps)
  and, with ``indices``, u32 row-major indices. Masks and the positions of
  sparse and quantized sections are all chosen here."""
  index = {c: codecs.encode_mask(nz, c) for c in candidates}
  if indices:
    index['u32'] = np.flatnonzero(nz).astype('<u4').tobytes()
  kind = min(index, key=lambda c: len(index[c]))
  return kind, index[kind]


def _decode_positions(blob, kind: str, shape, nnz: int) -> np.ndarray:
  """Row-major flat positions of a ``shape`` array's nonzeros."""
  n = math.prod(shape)
  if kind == 'u32':
    if len(blob) != 4 * nnz:
      raise ValueError(f'position index has {len(blob)} bytes for {nnz} positions')
    pos = np.frombuffer(blob, '<u4').astype(np.int64)
    if pos.size and (pos.max() >= n or (np.diff(pos) <= 0).any()):
      raise ValueError('positions are out of range or not increasing')
    return pos
  return np.flatnonzero(codecs.decode_mask(blob, kind, shape, nnz))


def _encode_quantized(q: codecs.Quantized):
  """A ``quant`` section: positions, float32 codebook, symbol counts
  (varints), rANS-coded symbols."""
  kind, index = _encode_positions(np.asarray(q.mask))
  counts = np.bincount(np.asarray(q.symbols, np.int64), minlength=len(q.codebook))
  used = counts > 0
  if used.any() and not used.all():  # levels no weight uses are not stored (same values)
    q = codecs.Quantized(q.mask, np.cumsum(used)[q.symbols] - 1, q.codebook[used], q.method,
                         q.bits)
    counts = counts[used]
  levels = len(q.codebook)
  symbols = codecs.rans_encode_symbols(q.symbols, counts) if q.nnz else b''
  blob = index + np.asarray(q.codebook, '<f4').tobytes() + codecs.encode_varints(counts) + symbols
  return blob, {'index': kind, 'index_length': len(index), 'nnz': q.nnz, 'levels': levels,
                'bits': int(q.bits), 'method': q.method, 'symbols_length': len(symbols)}


def _decode_quantized(blob, s):
  shape, n = tuple(s['shape']), math.prod(s['shape'])
  levels, il = s['levels'], s['index_length']
  pos = _decode_positions(blob[:il], s['index'], shape, s['nnz'])
  codebook = np.frombuffer(blob, '<f4', levels, il).astype(np.float32)
  sym_at = s['length'] - s['symbols_length']
  counts = codecs.decode_varints(blob[il + 4 * levels:sym_at], levels)
  if int(counts.sum()) != s['nnz']:
    raise ValueError(f'symbol counts sum to {int(counts.sum())}, not nnz={s["nnz"]}')
  if not np.isfinite(codebook).all():
    raise ValueError('the codebook holds non-finite values')
  sym_blob = blob[sym_at:]
  sym = (codecs.rans_decode_symbols(sym_blob, s['nnz'], counts) if s['nnz']
         else np.zeros(0, np.int64))
  out = np.zeros(n, np.float32)
  out[pos] = codebook[sym]
  return out.reshape(shape)


def _decode_sparse(blob, s):
  shape, n = tuple(s['shape']), math.prod(s['shape'])
  idx_blob, val_blob = blob[:s['index_length']], blob[s['index_length']:]
  pos = _decode_positions(idx_blob, s['index'], shape, s['nnz'])
  out = np.zeros(n, np.float32)
  out[pos] = codecs.decode_floats(val_blob, s['values_codec'], (s['nnz'],))
  return out.reshape(shape)


def write(path: str, header: dict, arrays: dict, float_codec: str = 'f32',
          mask_codec: str = 'auto', progress=None) -> int:
  """Writes the file atomically (temp file + rename); returns its size in bytes.

  Args:
    path: the file.
    header: the JSON header (model, param spec, ...).
    arrays: ``{name: array}``; names starting with ``mask/`` hold booleans;
      a ``codecs.Quantized`` value becomes a ``quant`` section, a
      ``codecs.Grid`` a ``grid`` section.
    float_codec, mask_codec: storage of float arrays / masks.
    progress: called as ``progress(done, total)`` (elements encoded so far,
      of all sections') before the first section and after each one.
  Returns:
    The file's size in bytes.
  """
  sections, blobs, offset = [], [], 0
  shapes = {k: tuple(v.shape) if isinstance(v, (codecs.Quantized, codecs.Grid)) else np.shape(v)
            for k, v in arrays.items()}
  total, done = sum(math.prod(s) for s in shapes.values()), 0
  if progress is not None:
    progress(0, total)
  for name in sorted(arrays):
    if isinstance(arrays[name], codecs.Quantized):
      codec, (blob, extra) = 'quant', _encode_quantized(arrays[name])
    elif isinstance(arrays[name], codecs.Grid):
      codec, blob, extra = 'grid', codecs.encode_grid(arrays[name]), {}
    elif is_mask(name):
      bits = np.asarray(arrays[name]).astype(bool)
      codec, blob = _encode_positions(
          bits, codecs.MASK_CODECS if mask_codec == 'auto' else (mask_codec,), indices=False)
      extra = {'ones': int(bits.sum())}
    else:
      codec, blob, extra = _encode_float_section(np.asarray(arrays[name]), float_codec)
    sections.append({'name': name, 'codec': codec, 'shape': list(shapes[name]),
                     'offset': offset, 'length': len(blob), **extra})
    blobs.append(blob)
    offset += len(blob)
    done += math.prod(shapes[name])
    if progress is not None:
      progress(done, total)
  head = encode_header({**header, 'sections': sections})
  body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + b''.join(blobs)
  data = body + hashlib.sha256(body).digest()
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException as e:  # a missing folder, a full disk, Ctrl-C: nothing is left behind
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise ArtifactError(f'cannot write model file {path!r}: {e.strerror or e}') from e
    raise
  return len(data)


def _unique_keys(pairs):
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f'the key {k[:64]!r} appears twice in one object')
    out[k] = v
  return out


def _no_constant(name):
  raise ValueError(f'{name} is not a JSON number')


def encode_header(header: dict) -> bytes:
  """A header as a file of the current format holds it: compact JSON, sorted
  keys, zlib-compressed (level 9)."""
  return zlib.compress(json.dumps(header, sort_keys=True, separators=(',', ':')).encode(), 9)


def decode_header(raw: bytes):
  """Inverse of ``encode_header``: decompressed to at most
  ``schema.MAX_HEADER_BYTES``, then ``strict_json``. ValueError when it is
  not one complete zlib stream within that size."""
  d = zlib.decompressobj()
  try:
    text = d.decompress(raw, schema.MAX_HEADER_BYTES + 1)
  except zlib.error as e:
    raise ValueError(f'the header is not zlib-compressed data ({e})') from None
  if len(text) > schema.MAX_HEADER_BYTES:
    raise ValueError(f'the header decompresses to more than {schema.MAX_HEADER_BYTES} bytes')
  if not d.eof or d.unused_data:
    raise ValueError('the compressed header is incomplete or followed by other bytes')
  return strict_json(text)


def strict_json(raw: bytes):
  """A header's JSON as ``write`` makes it: UTF-8 without a byte-order mark,
  no key twice in an object, no NaN/Infinity (ValueError otherwise; Python's
  ``json.loads`` would accept all three, the last duplicate winning)."""
  if raw.startswith(b'\xef\xbb\xbf'):
    raise ValueError('it starts with a byte-order mark (not as written)')
  text = raw.decode('utf-8')  # strict: UTF-16/32 and invalid bytes are refused
  return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def read_header(path: str) -> tuple[dict, bytes, int]:
  """(header, body, offset of the first section in body): everything but the
  sections checked. Raises ArtifactError naming what is wrong."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ArtifactError(f'cannot read model file {path!r}: {e}') from e
  if len(data) < _PREFIX.size + 32 or data[:8] != MAGIC:
    raise ArtifactError(f'{path!r} is not a pemn_jax model file (bad magic or too short)')
  _, version, head_len = _PREFIX.unpack_from(data)
  if version != FORMAT_VERSION:
    raise ArtifactError(f'{path!r} has format version {version}; this pemn_jax reads version '
                        f'{FORMAT_VERSION}' + (' (re-export it from its run, or rerun its '
                                               'evolve command)' if version < FORMAT_VERSION
                                               else ''))
  body, digest = data[:-32], data[-32:]
  if hashlib.sha256(body).digest() != digest:
    raise ArtifactError(f'{path!r} is truncated or corrupted (checksum mismatch)')
  if head_len > schema.MAX_HEADER_BYTES or _PREFIX.size + head_len > len(body):
    raise ArtifactError(f'{path!r}: header length {head_len} is out of range')
  try:
    header = decode_header(body[_PREFIX.size:_PREFIX.size + head_len])
  except (ValueError, RecursionError) as e:
    raise ArtifactError(f'{path!r}: unreadable header: {str(e)[:200]}') from None
  base = _PREFIX.size + head_len
  try:
    schema.check_header(header, len(body) - base)
  except schema.SchemaError as e:
    raise ArtifactError(f'{path!r}: {e}') from None
  return header, body, base


def decode_sections(path: str, header: dict, body: bytes, base: int,
                    expected: dict | None = None) -> dict[str, np.ndarray]:
  """Decodes the sections of a checked header.

  Args:
    path: for messages.
    header, body, base: ``read_header``'s output.
    expected: ``{name: (shape, is_mask)}`` the model needs; when given, the
      file must hold exactly these sections with these shapes and kinds, and
      nothing is decoded before all of them are checked.
  Returns:
    ``{name: array}`` (float32 or bool).
  """
  sections = header['sections']
  if expected is not None:
    got = {s['name'] for s in sections}
    if got != set(expected):
      missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
      raise ArtifactError(f'{path!r} does not hold the sections this model needs (missing '
                          f'{missing[:5]}, unexpected {extra[:5]})')
    for s in sections:
      shape, is_mask = expected[s['name']]
      if tuple(s['shape']) != tuple(shape):
        raise ArtifactError(f'{path!r}: section {s["name"]!r} has shape {tuple(s["shape"])}, the '
                            f'model needs {tuple(shape)}')
      if (s['codec'] in codecs.MASK_CODECS) != is_mask:
        raise ArtifactError(f'{path!r}: section {s["name"]!r} is stored as {s["codec"]!r}, the '
                            f'model needs {"a mask" if is_mask else "floats"} there')
  arrays = {}
  for s in sections:
    blob = body[base + s['offset']: base + s['offset'] + s['length']]
    try:
      if s['codec'] == 'sparse':
        arrays[s['name']] = _decode_sparse(blob, s)
      elif s['codec'] == 'quant':
        arrays[s['name']] = _decode_quantized(blob, s)
      elif s['codec'] == 'grid':
        arrays[s['name']] = codecs.decode_grid(blob, tuple(s['shape']))
      elif s['codec'] in codecs.FLOAT_CODECS:
        arrays[s['name']] = codecs.decode_floats(blob, s['codec'], tuple(s['shape']))
      else:
        arrays[s['name']] = codecs.decode_mask(blob, s['codec'], tuple(s['shape']), s['ones'])
    except ValueError as e:
      raise ArtifactError(f'{path!r}: section {s["name"]!r}: {e}') from None
  return arrays


def read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(header, arrays) of a model file, for inspection; loading a model for use
  goes through ``pemn_jax.export.model_file.load``, which also checks every section
  against what the model needs. Raises ArtifactError naming what is wrong."""
  header, body, base = read_header(path)
  return header, decode_sections(path, header, body, base)


def report(header: dict, file_bytes: int, num_params: int) -> str:
  """Bytes on disk vs dense float32, per-section breakdown, bits per weight."""
  dense = 4 * num_params
  lines = [f'file: {file_bytes} bytes on disk; dense float32 params: {dense} bytes '
           f'({dense / file_bytes:.1f}x larger); {8 * file_bytes / num_params:.3f} bits per '
           f'weight over N={num_params}',
           f'{"section":44s} {"codec":6s} {"elements":>9s} {"bytes":>9s} {"bits/elem":>9s} '
           f'{"H(k)":>6s}']
  for s in header['sections']:
    n = math.prod(s['shape']) or 1
    h = ''
    if 'ones' in s:
      h = f'{codecs.entropy_bits(s["ones"], n) / n:6.3f}'
    lines.append(f'{s["name"]:44s} {s["codec"]:6s} {n:9d} {s["length"]:9d} '
                 f'{8 * s["length"] / n:9.3f} {h:>6s}')
  masks = [s for s in header['sections'] if 'ones' in s]
  if masks:
    n = sum(math.prod(s['shape']) for s in masks)
    got = 8 * sum(s['length'] for s in masks)
    ent = sum(codecs.entropy_bits(s['ones'], math.prod(s['shape'])) for s in masks)
    lines.append(f'masks: {got / n:.4f} bits/weight achieved vs H(k) {ent / n:.4f} vs 1 bit '
                 f'(bit-packed)')
  head = len(encode_header(header))
  lines.append(f'header (config, seed, section table; compressed): ~{head} bytes')
  return '\n'.join(lines)
