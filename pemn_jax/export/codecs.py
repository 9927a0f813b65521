"""Codecs for artifact sections: floats (f32/f16/bf16) and binary masks
(bit-packed, or a static binary arithmetic code reaching ~H(k) bits/weight)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

FLOAT_CODECS = {'f32': np.float32, 'f16': np.float16, 'bf16': ml_dtypes.bfloat16}
MASK_CODECS = ('bits', 'arith')


def encode_floats(x: np.ndarray, codec: str) -> bytes:
  if codec not in FLOAT_CODECS:
    raise ValueError(f'unknown float codec {codec!r}; known: {sorted(FLOAT_CODECS)}')
  return np.ascontiguousarray(np.asarray(x, np.float32).astype(FLOAT_CODECS[codec])).tobytes()


def decode_floats(data: bytes, codec: str, shape) -> np.ndarray:
  dt = np.dtype(FLOAT_CODECS[codec])
  n = math.prod(shape)
  if len(data) != n * dt.itemsize:
    raise ValueError(f'float section has {len(data)} bytes, expected {n * dt.itemsize}')
  return np.frombuffer(data, dt).astype(np.float32).reshape(shape)


def entropy_bits(ones: int, n: int) -> float:
  """n * H(ones / n): the information content of a mask of that density."""
  if ones in (0, n):
    return 0.0
  p = ones / n
  return -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))


_TOP, _HALF, _QUARTER = 0xFFFFFFFF, 0x80000000, 0x40000000


def _p0(ones: int, n: int) -> int:
  """P(bit = 0) as a 16-bit integer in [1, 65535]."""
  return min(65535, max(1, round((n - ones) / n * 65536)))


def arith_encode(bits: np.ndarray) -> bytes:
  """Static binary arithmetic code of a 0/1 array (probability = its density)."""
  bits = np.asarray(bits, np.uint8).reshape(-1)
  n, ones = bits.size, int(bits.sum())
  p0 = _p0(ones, n)
  low, high, pending = 0, _TOP, 0
  out = []
  emit = out.append
  for b in bits.tolist():
    split = low + (((high - low + 1) * p0) >> 16) - 1
    if b:
      low = split + 1
    else:
      high = split
    while True:
      if high < _HALF:
        emit(0)
        out.extend([1] * pending)
        pending = 0
      elif low >= _HALF:
        emit(1)
        out.extend([0] * pending)
        pending = 0
        low -= _HALF
        high -= _HALF
      elif low >= _QUARTER and high < _HALF + _QUARTER:
        pending += 1
        low -= _QUARTER
        high -= _QUARTER
      else:
        break
      low, high = 2 * low, 2 * high + 1
  pending += 1
  if low < _QUARTER:
    emit(0)
    out.extend([1] * pending)
  else:
    emit(1)
    out.extend([0] * pending)
  return np.packbits(np.asarray(out, np.uint8)).tobytes()


def arith_decode(data: bytes, n: int, ones: int) -> np.ndarray:
  p0 = _p0(ones, n)
  stream = np.unpackbits(np.frombuffer(data, np.uint8)).tolist()
  stream.extend([0] * 32)
  pos = 32
  value = int(''.join(map(str, stream[:32])), 2)
  low, high = 0, _TOP
  out = np.empty(n, np.uint8)
  for i in range(n):
    split = low + (((high - low + 1) * p0) >> 16) - 1
    if value > split:
      out[i] = 1
      low = split + 1
    else:
      out[i] = 0
      high = split
    while True:
      if high < _HALF:
        pass
      elif low >= _HALF:
        low -= _HALF
        high -= _HALF
        value -= _HALF
      elif low >= _QUARTER and high < _HALF + _QUARTER:
        low -= _QUARTER
        high -= _QUARTER
        value -= _QUARTER
      else:
        break
      low, high = 2 * low, 2 * high + 1
      value = 2 * value + (stream[pos] if pos < len(stream) else 0)
      pos += 1
  if int(out.sum()) != ones:
    raise ValueError('arithmetic-coded mask decodes to the wrong number of ones (corrupt data)')
  return out


def encode_mask(mask: np.ndarray, codec: str) -> bytes:
  if codec == 'bits':
    return np.packbits(np.asarray(mask, np.uint8).reshape(-1)).tobytes()
  if codec == 'arith':
    return arith_encode(mask)
  raise ValueError(f'unknown mask codec {codec!r}; known: {MASK_CODECS}')


def decode_mask(data: bytes, codec: str, shape, ones: int) -> np.ndarray:
  n = math.prod(shape)
  if codec == 'bits':
    if len(data) != (n + 7) // 8:
      raise ValueError(f'bit-packed mask has {len(data)} bytes, expected {(n + 7) // 8}')
    out = np.unpackbits(np.frombuffer(data, np.uint8))[:n]
  elif codec == 'arith':
    out = arith_decode(data, n, ones)
  else:
    raise ValueError(f'unknown mask codec {codec!r}; known: {MASK_CODECS}')
  return out.reshape(shape).astype(bool)
