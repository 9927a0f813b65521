"""Codecs for artifact sections: floats (f32/f16/bf16, or on a uniform grid
through 0 with entropy-coded integer levels) and binary masks (bit-packed, an
interleaved rANS entropy code reaching ~H(k) bits/weight, or its order-1 form
where a bit's probability depends on its neighbour's)."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

FLOAT_CODECS = {'f32': np.float32, 'f16': np.float16, 'bf16': ml_dtypes.bfloat16}
MASK_CODECS = ('bits', 'rans', 'rans1')
QUANT_METHODS = ('uniform', 'kmeans', 'log')


@dataclasses.dataclass
class Quantized:
  """A layer's survivors as ``codebook[symbols]`` at the positions of ``mask``
  (a ``quant`` section of a model file)."""
  mask: np.ndarray       # bool, the layer's shape
  symbols: np.ndarray    # int, one per survivor (row-major order)
  codebook: np.ndarray   # float32, 2^bits levels
  method: str
  bits: int

  @property
  def shape(self) -> tuple:
    return self.mask.shape

  def dense(self) -> np.ndarray:
    out = np.zeros(self.mask.shape, np.float32)
    out[self.mask] = self.codebook[self.symbols]
    return out

  @property
  def nnz(self) -> int:
    return int(self.mask.sum())


GRID_BITS = (2, 16)     # the range of a grid's bits
_GRID_RANS_SPAN = 4096  # the most levels a grid's rANS table (one varint each) may hold


@dataclasses.dataclass
class Grid:
  """An array on a uniform grid through 0: ``step * levels`` (a ``grid``
  section). Zeros stay exactly zero, so a pruned array keeps its zeros."""
  levels: np.ndarray     # int64, the array's shape
  step: float            # a float32 value >= 0 (0: every value is 0)

  @classmethod
  def of(cls, x: np.ndarray, bits: int) -> Grid:
    """``x`` rounded to the nearest of ``2^bits - 1`` levels ``k * step``,
    ``|k| <= 2^(bits-1) - 1``, ``step = max|x| / (2^(bits-1) - 1)``: every
    value moves by at most ``step / 2``."""
    if not GRID_BITS[0] <= bits <= GRID_BITS[1]:
      raise ValueError(f'grid bits must be in [{GRID_BITS[0]}, {GRID_BITS[1]}], got {bits}')
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all():
      raise ValueError('an array with non-finite values cannot be put on a grid')
    top = (1 << (bits - 1)) - 1
    peak = float(np.abs(x).max()) if x.size else 0.0
    step = np.float32(peak / top)  # (stored as float32: rounded up, so top levels reach peak)
    if float(step) * top < peak:
      step = np.nextafter(step, np.float32(np.inf))
    step = float(step)
    levels = np.clip(np.rint(x / step), -top, top) if step else np.zeros(x.shape)
    return cls(levels.astype(np.int64), step)

  def dense(self) -> np.ndarray:
    return grid_values(self.levels, self.step)

  @property
  def shape(self) -> tuple:
    return self.levels.shape


def grid_values(levels: np.ndarray, step: float) -> np.ndarray:
  """The float32 values of grid levels (computed in float64, then rounded
  once, so the encoder and the decoder agree bit for bit)."""
  return (np.asarray(levels, np.float64) * float(step)).astype(np.float32)


def _bit_width(span: int) -> int:
  return (span - 1).bit_length()


_GRID_CODINGS = ('bits', 'rans')
_GRID_TOP = (1 << (GRID_BITS[1] - 1)) - 1  # the largest |level| a file may hold


def encode_grid(g: Grid) -> bytes:
  """A grid as a section's bytes: its step (float32), three varints -- its
  lowest level (zigzag), the number of levels from there, the coding --
  then the levels minus the lowest in the smaller of two codes: fixed-width
  bit-packed (``bits``, 0: small arrays) or varint counts + rANS (``rans``,
  1: ~the levels' entropy)."""
  flat = g.levels.reshape(-1)
  low = int(flat.min()) if flat.size else 0
  span = int(flat.max()) - low + 1 if flat.size else 1
  sym = flat - low
  width = _bit_width(span)
  codes = [np.packbits(((sym[:, None] >> np.arange(width)) & 1).astype(np.uint8),
                       bitorder='little').tobytes()]
  if flat.size and span <= _GRID_RANS_SPAN:
    counts = np.bincount(sym, minlength=span)
    codes.append(encode_varints(counts) + rans_encode_symbols(sym, counts))
  coding = min(range(len(codes)), key=lambda c: len(codes[c]))
  step = np.float32(g.step)
  if float(step) != g.step or not step >= 0:
    raise ValueError(f'a grid step must be a float32 value >= 0, got {g.step!r}')
  return (step.astype('<f4').tobytes() + encode_varints([2 * low if low >= 0 else -2 * low - 1,
                                                          span, coding]) + codes[coding])


def decode_grid(data: bytes, shape) -> np.ndarray:
  """Inverse of ``encode_grid``: the float32 values (ValueError on bytes that
  are not such a code; bounded time whatever the bytes)."""
  n = math.prod(shape)
  if len(data) < 4:
    raise ValueError('a grid section is shorter than its step')
  step = float(np.frombuffer(data, '<f4', 1)[0])
  if not (math.isfinite(step) and step >= 0):
    raise ValueError(f'the grid step {step} is not a finite number >= 0')
  head, used = read_varints(data[4:], 3)
  zig, span, coding = (int(v) for v in head)
  low = zig // 2 if zig % 2 == 0 else -(zig + 1) // 2
  if not (-_GRID_TOP <= low and 1 <= span and low + span - 1 <= _GRID_TOP):
    raise ValueError(f'grid levels {low}..{low + span - 1} lie outside +-{_GRID_TOP}')
  if coding >= len(_GRID_CODINGS):
    raise ValueError(f'unknown grid coding {coding}')
  data = data[4 + used:]
  if _GRID_CODINGS[coding] == 'bits':
    width = _bit_width(span)
    if len(data) != (n * width + 7) // 8:
      raise ValueError(f'bit-packed grid has {len(data)} bytes, expected {(n * width + 7) // 8}')
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder='little')[:n * width]
    sym = (bits.reshape(n, width).astype(np.int64) << np.arange(width)).sum(1)
    if sym.size and int(sym.max()) >= span:
      raise ValueError(f'a grid level lies outside its span of {span}')
  else:
    if span > _GRID_RANS_SPAN:
      raise ValueError(f'a rANS-coded grid of {span} levels (at most {_GRID_RANS_SPAN})')
    counts, used = read_varints(data, span)
    if int(counts.sum()) != n:
      raise ValueError(f'grid level counts sum to {int(counts.sum())}, not {n}')
    sym = rans_decode_symbols(data[used:], n, counts)
  return grid_values(sym + low, step).reshape(shape)


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


# Binary masks: interleaved rANS (Duda's asymmetric numeral systems) with a
# static probability, 16-bit precision and 16-bit renormalization. The state
# lives in [2^16, 2^32); decoding a symbol needs at most one 16-bit read, so S
# independent streams (contiguous chunks of STEPS symbols) decode in lockstep
# as numpy vector operations: an 11M-weight mask decodes in a fraction of a
# second instead of the ~5 s of a bitwise arithmetic decoder in Python. The
# encoder writes the words in the order the decoder reads them (step by step,
# stream by stream), so one flat word array needs no per-stream offsets. Cost
# over n*H(k): 4 bytes of final state per stream (<= 0.002 bits/weight) + the
# 16-bit probability quantization.
_PREC = 16
_M = 1 << _PREC
_LOW = 1 << 16          # lower bound of the state
STEPS = 16384           # symbols per stream (4 bytes of state each, ~0.1 s per 11M decoded)


def rans_streams(n: int) -> int:
  """Number of interleaved streams of an n-symbol mask."""
  return max(1, -(-n // STEPS))


def quantize_counts(counts) -> np.ndarray:
  """Symbol counts -> frequencies summing to 2^16, every present symbol >= 1:
  floors of the exact shares, the remainder to the most frequent symbol (or
  taken from the largest frequencies when the floor of 1 overshoots).
  Deterministic, so the encoder and the decoder agree."""
  counts = np.asarray(counts, np.int64)
  total = int(counts.sum())
  if total <= 0 or (counts < 0).any():
    raise ValueError('symbol counts must be >= 0 with a positive total')
  present = counts > 0
  if int(present.sum()) > _M:
    raise ValueError('too many distinct symbols for 16-bit frequencies')
  f = np.where(present, np.maximum(1, (counts * _M) // total), 0).astype(np.int64)
  diff = _M - int(f.sum())
  if diff > 0:
    f[int(np.argmax(counts))] += diff
  while diff < 0:
    j = int(np.argmax(f))
    take = min(-diff, int(f[j]) - 1)
    f[j] -= take
    diff += take
  return f


def _tables(counts) -> tuple[np.ndarray, np.ndarray]:
  """(freq, cum) of shape (contexts, symbols) from per-context counts."""
  freq = np.stack([quantize_counts(c) for c in np.atleast_2d(counts)]).astype(np.uint64)
  cum = np.concatenate([np.zeros((len(freq), 1), np.uint64), np.cumsum(freq, 1)[:, :-1]], 1)
  return freq, cum.astype(np.uint64)


def _layout(n: int) -> tuple[int, int]:
  streams = rans_streams(n)
  return streams, -(-n // streams)


def _rans_encode(pad: np.ndarray, freq, cum, markov: bool) -> bytes:
  """Interleaved rANS of ``pad`` (streams x steps symbols); the context of a
  symbol is the one before it in its stream (0 first) when ``markov``, else 0."""
  streams, steps = pad.shape
  prev = np.zeros_like(pad)
  if markov:
    prev[:, 1:] = pad[:, :-1]
  x = np.full(streams, _LOW, np.uint64)
  words = np.zeros((steps, streams), np.uint16)
  emitted = np.zeros((steps, streams), bool)
  for t in range(steps - 1, -1, -1):   # rANS encodes backwards
    s, c = pad[:, t], prev[:, t]
    f = freq[c, s]
    e = x >= (f << np.uint64(16))      # renormalize: at most one word per symbol
    words[t] = (x & np.uint64(0xFFFF)).astype(np.uint16)
    emitted[t] = e
    x = np.where(e, x >> np.uint64(16), x)
    x = (x // f) * np.uint64(_M) + (x % f) + cum[c, s]
  return x.astype('<u4').tobytes() + words[emitted].astype('<u2').tobytes()


def _rans_decode(data: bytes, n: int, freq, cum, markov: bool) -> np.ndarray:
  """Inverse of ``_rans_encode``: the first n symbols, in stream order
  (ValueError on data that is not a valid code; bounded time whatever the
  bytes)."""
  streams, steps = _layout(n)
  if len(data) < 4 * streams or (len(data) - 4 * streams) % 2:
    raise ValueError(f'rANS stream of {len(data)} bytes does not fit {streams} streams')
  if len(data) - 4 * streams > 2 * streams * steps:
    raise ValueError('rANS stream has more words than it can read')
  table = np.stack([np.repeat(np.arange(f.size), f.astype(np.int64)) for f in freq])  # slot->sym
  x = np.frombuffer(data, '<u4', streams).astype(np.uint64)
  words = np.frombuffer(data, '<u2', offset=4 * streams).astype(np.uint64)
  out = np.empty((steps, streams), np.int64)
  mask, ptr = np.uint64(_M - 1), 0
  c = np.zeros(streams, np.int64)
  for t in range(steps):
    slot = x & mask
    s = table[c, slot.astype(np.intp)]
    out[t] = s
    x = freq[c, s] * (x >> np.uint64(_PREC)) + slot - cum[c, s]
    need = x < np.uint64(_LOW)
    k = int(np.count_nonzero(need))
    if k:
      if ptr + k > words.size:
        raise ValueError('rANS stream is truncated')
      x[need] = (x[need] << np.uint64(16)) | words[ptr:ptr + k]
      ptr += k
    if markov:
      c = s
  if ptr != words.size or (x != np.uint64(_LOW)).any():
    raise ValueError('rANS stream is corrupt (the decoder did not end in its start state)')
  return out.T.reshape(-1)[:n]


def rans_encode_symbols(symbols: np.ndarray, counts) -> bytes:
  """rANS code of symbols in [0, len(counts)) with static frequencies from
  ``counts`` (which the decoder is given too)."""
  sym = np.asarray(symbols).reshape(-1).astype(np.intp)
  n = sym.size
  freq, cum = _tables(counts)
  if n == 0 or (freq == np.uint64(_M)).any():  # nothing, or one symbol: nothing to code
    return b''
  streams, steps = _layout(n)
  pad = np.full(streams * steps, int(np.argmax(freq[0])), np.intp)  # the likeliest symbol
  pad[:n] = sym
  return _rans_encode(pad.reshape(streams, steps), freq, cum, markov=False)


def rans_decode_symbols(data: bytes, n: int, counts) -> np.ndarray:
  """Inverse of ``rans_encode_symbols``; ValueError on data that is not a valid
  code of n symbols with these counts (bounded time whatever the bytes)."""
  counts = np.asarray(counts, np.int64)
  freq, cum = _tables(counts)
  if n == 0 or (freq == np.uint64(_M)).any():
    if data:
      raise ValueError('a constant symbol stream has no coded bytes')
    return np.full(n, int(np.argmax(freq[0])), np.int64)
  sym = _rans_decode(data, n, freq, cum, markov=False)
  if not np.array_equal(np.bincount(sym, minlength=counts.size), counts):
    raise ValueError('rANS stream decodes to other symbol counts (corrupt data)')
  return sym


def _transitions(pad: np.ndarray, n: int) -> np.ndarray:
  """(previous bit, bit) counts over the first n symbols of padded streams
  (a stream's first bit counts under previous bit 0)."""
  prev = np.zeros_like(pad)
  prev[:, 1:] = pad[:, :-1]
  real = (np.arange(pad.size) < n).reshape(pad.shape)
  return np.bincount(2 * prev[real] + pad[real], minlength=4).reshape(2, 2)


def rans1_encode(bits: np.ndarray) -> bytes:
  """Order-1 rANS of a 0/1 array in column-major order (the first axis
  fastest: for a ``(inputs, outputs)`` kernel, one unit's inputs in a row,
  where neighbouring inputs -- pixels -- are kept or pruned together): the
  probability of a bit depends on the bit before it in its stream. Four
  varint transition counts, then the streams; b'' if constant."""
  flat = np.asarray(bits, bool).reshape(-1, order='F').astype(np.intp)
  n, ones = flat.size, int(flat.sum())
  if ones in (0, n):
    return b''
  streams, steps = _layout(n)
  pad = np.zeros(streams * steps, np.intp)
  pad[:n] = flat
  pad = pad.reshape(streams, steps)
  counts = _transitions(pad, n)
  freq, cum = _tables(counts + 1)  # (+1: padding and unseen transitions stay codable)
  return encode_varints(counts.reshape(-1)) + _rans_encode(pad, freq, cum, markov=True)


def rans1_decode(data: bytes, shape, ones: int) -> np.ndarray:
  """Inverse of ``rans1_encode`` (ValueError on data that is not a valid code
  of this many ones)."""
  n = math.prod(shape)
  if not 0 <= ones <= n:
    raise ValueError(f'mask with {ones} ones of {n}')
  if ones in (0, n):
    if data:
      raise ValueError('a constant mask has no coded bytes')
    return np.full(shape, ones == n, bool)
  counts, at = read_varints(data, 4)
  counts = counts.reshape(2, 2)
  if int(counts.sum()) != n or int(counts[:, 1].sum()) != ones:
    raise ValueError('the mask\'s transition counts do not match its size and number of ones')
  freq, cum = _tables(counts + 1)
  flat = _rans_decode(data[at:], n, freq, cum, markov=True)
  streams, steps = _layout(n)
  pad = np.zeros(streams * steps, np.int64)
  pad[:n] = flat
  if not np.array_equal(_transitions(pad.reshape(streams, steps), n), counts):
    raise ValueError('the mask decodes to other transition counts (corrupt data)')
  return flat.astype(bool).reshape(shape, order='F')


def encode_varints(values) -> bytes:
  """Unsigned integers < 2^32 as LEB128 varints (7 bits per byte, low first)."""
  out = bytearray()
  for v in np.asarray(values, np.int64).reshape(-1).tolist():
    if not 0 <= v < 1 << 32:
      raise ValueError(f'varint out of range: {v}')
    while v >= 0x80:
      out.append(v & 0x7F | 0x80)
      v >>= 7
    out.append(v)
  return bytes(out)


def read_varints(data: bytes, count: int) -> tuple[np.ndarray, int]:
  """The first ``count`` varints of ``data`` and the bytes they take
  (ValueError when data ends first or one is longer than 5 bytes)."""
  out, v, shift, i = [], 0, 0, 0
  while len(out) < count:
    if i >= len(data):
      raise ValueError(f'{len(data)} bytes do not hold {count} varints')
    b = data[i]
    i += 1
    if shift > 28:
      raise ValueError('a varint is longer than 5 bytes')
    v |= (b & 0x7F) << shift
    shift += 7
    if b < 0x80:
      out.append(v)
      v, shift = 0, 0
  return np.asarray(out, np.int64), i


def decode_varints(data: bytes, count: int) -> np.ndarray:
  """Exactly ``count`` varints filling ``data`` (ValueError otherwise)."""
  out, used = read_varints(data, count)
  if used != len(data):
    raise ValueError(f'{len(data)} bytes do not hold exactly {count} varints')
  return out


def rans_encode(bits: np.ndarray) -> bytes:
  """rANS code of a 0/1 array (probability = its density); b'' if constant."""
  bits = np.asarray(bits, bool).reshape(-1)
  ones = int(bits.sum())
  if ones in (0, bits.size):
    return b''
  return rans_encode_symbols(bits.astype(np.intp), [bits.size - ones, ones])


def rans_decode(data: bytes, n: int, ones: int) -> np.ndarray:
  """Inverse of ``rans_encode``."""
  if not 0 <= ones <= n:
    raise ValueError(f'mask with {ones} ones of {n}')
  if ones in (0, n):
    if data:
      raise ValueError('a constant mask has no coded bytes')
    return np.full(n, ones == n, np.uint8)
  try:
    return rans_decode_symbols(data, n, [n - ones, ones]).astype(np.uint8)
  except ValueError as e:
    raise ValueError(str(e).replace('stream', 'mask').replace('symbol counts', 'number of ones')
                     .replace('decodes to other', 'decodes to the wrong')) from None


def encode_mask(mask: np.ndarray, codec: str) -> bytes:
  """A boolean array (its shape matters to ``rans1``'s order) as ``codec``."""
  if codec == 'bits':
    return np.packbits(np.asarray(mask, np.uint8).reshape(-1)).tobytes()
  if codec == 'rans':
    return rans_encode(mask)
  if codec == 'rans1':
    return rans1_encode(mask)
  raise ValueError(f'unknown mask codec {codec!r}; known: {MASK_CODECS}')


def decode_mask(data: bytes, codec: str, shape, ones: int) -> np.ndarray:
  n = math.prod(shape)
  if codec == 'bits':
    if len(data) != (n + 7) // 8:
      raise ValueError(f'bit-packed mask has {len(data)} bytes, expected {(n + 7) // 8}')
    out = np.unpackbits(np.frombuffer(data, np.uint8))[:n]
  elif codec == 'rans':
    out = rans_decode(data, n, ones)
  elif codec == 'rans1':
    return rans1_decode(data, tuple(shape), ones)
  else:
    raise ValueError(f'unknown mask codec {codec!r}; known: {MASK_CODECS}')
  return out.reshape(shape).astype(bool)
