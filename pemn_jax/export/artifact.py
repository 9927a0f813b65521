"""The ``.pemn`` model file: self-contained, checksummed, no pickle.

Layout::

    b'PEMNJAX\\0'  u32 format version  u32 header length  header (UTF-8 JSON)
    section bytes ...                  sha256 of everything before (32 bytes)

The header holds the model and parameterization config, the seed and a table
of sections (name, codec, shape, offset, length); sections are float arrays
(f32/f16/bf16) or boolean masks (bit-packed or arithmetic-coded).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import numpy as np

from pemn_jax.export import codecs

MAGIC = b'PEMNJAX\x00'
FORMAT_VERSION = 1
_PREFIX = struct.Struct('<8sII')


class ArtifactError(ValueError):
  """A model file that cannot be read (truncated, corrupt, other version)."""


def _is_mask(name: str) -> bool:
  return name.startswith('mask/') or '/mask/' in name


def _encode_float_section(x, float_codec):
  """Dense floats, or -- when smaller -- the nonzeros plus their positions as a
  bitmap (bit-packed or arithmetic-coded) or as uint32 indices."""
  dense = codecs.encode_floats(x, float_codec)
  nz = np.asarray(x).reshape(-1) != 0
  nnz = int(nz.sum())
  if nnz == nz.size or x.size < 64:
    return float_codec, dense, {}
  values = codecs.encode_floats(np.asarray(x).reshape(-1)[nz], float_codec)
  index = {c: codecs.encode_mask(nz, c) for c in codecs.MASK_CODECS}
  index['u32'] = np.flatnonzero(nz).astype('<u4').tobytes()
  kind = min(index, key=lambda c: len(index[c]))
  if len(index[kind]) + len(values) >= len(dense):
    return float_codec, dense, {}
  return 'sparse', index[kind] + values, {'values_codec': float_codec, 'index': kind,
                                          'nnz': nnz, 'index_length': len(index[kind])}


def _decode_sparse(blob, s):
  shape, n = tuple(s['shape']), math.prod(s['shape'])
  idx_blob, val_blob = blob[:s['index_length']], blob[s['index_length']:]
  if s['index'] == 'u32':
    pos = np.frombuffer(idx_blob, '<u4').astype(np.int64)
    if pos.size != s['nnz'] or (pos.size and pos.max() >= n):
      raise ValueError('bad sparse index')
  else:
    pos = np.flatnonzero(codecs.decode_mask(idx_blob, s['index'], (n,), s['nnz']))
  out = np.zeros(n, np.float32)
  out[pos] = codecs.decode_floats(val_blob, s['values_codec'], (s['nnz'],))
  return out.reshape(shape)


def write(path: str, header: dict, arrays: dict[str, np.ndarray], float_codec: str = 'f32',
          mask_codec: str = 'auto') -> int:
  """Writes the file atomically (temp file + rename); returns its size in bytes."""
  sections, blobs, offset = [], [], 0
  for name in sorted(arrays):
    x = np.asarray(arrays[name])
    if _is_mask(name):
      bits = x.astype(bool)
      cands = codecs.MASK_CODECS if mask_codec == 'auto' else (mask_codec,)
      enc = {c: codecs.encode_mask(bits, c) for c in cands}
      codec = min(enc, key=lambda c: len(enc[c]))
      blob = enc[codec]
      extra = {'ones': int(bits.sum())}
    else:
      codec, blob, extra = _encode_float_section(x, float_codec)
    sections.append({'name': name, 'codec': codec, 'shape': list(x.shape), 'offset': offset,
                     'length': len(blob), **extra})
    blobs.append(blob)
    offset += len(blob)
  head = json.dumps({**header, 'sections': sections}, sort_keys=True).encode()
  body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + b''.join(blobs)
  data = body + hashlib.sha256(body).digest()
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)
  return len(data)


def read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (header, arrays); raises ArtifactError naming what is wrong."""
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
                        f'{FORMAT_VERSION}')
  body, digest = data[:-32], data[-32:]
  if hashlib.sha256(body).digest() != digest:
    raise ArtifactError(f'{path!r} is truncated or corrupted (checksum mismatch)')
  try:
    header = json.loads(body[_PREFIX.size:_PREFIX.size + head_len])
  except ValueError as e:
    raise ArtifactError(f'{path!r}: unreadable header: {e}') from e
  base = _PREFIX.size + head_len
  arrays = {}
  for s in header['sections']:
    blob = body[base + s['offset']: base + s['offset'] + s['length']]
    if len(blob) != s['length']:
      raise ArtifactError(f'{path!r}: section {s["name"]!r} is truncated')
    try:
      if s['codec'] == 'sparse':
        arrays[s['name']] = _decode_sparse(blob, s)
      elif s['codec'] in codecs.FLOAT_CODECS:
        arrays[s['name']] = codecs.decode_floats(blob, s['codec'], tuple(s['shape']))
      else:
        arrays[s['name']] = codecs.decode_mask(blob, s['codec'], tuple(s['shape']), s['ones'])
    except ValueError as e:
      raise ArtifactError(f'{path!r}: section {s["name"]!r}: {e}') from e
  return header, arrays


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
  head = len(json.dumps(header, sort_keys=True))
  lines.append(f'header (config, seed, section table): ~{head} bytes')
  return '\n'.join(lines)
