"""Decoding encoded images (JPEG/PNG bytes) to fixed-size uint8 batches, in
worker processes.

Training: Inception-style random-resized crop (area 0.08-1 of the image,
aspect 3/4-4/3 log-uniform, 10 tries, then a centre crop clamped to that
aspect: torchvision's ``RandomResizedCrop``), bilinear resize to ``size``,
horizontal flip with probability 0.5. Evaluation: resize the shorter side to
``int(size / 0.875)`` (bilinear), centre crop ``size``. Every draw comes from
``decode_rng(seed, step, position)``, so a decoded batch is a pure
function of (seed, step) whatever the number of workers (a stream of its
own: ``config.augment``'s ops on the decoded batch draw independently).

``Decoder`` spreads a batch over ``workers`` processes (``spawn``: no fork of
a process running JAX). Each reads its examples' records from the data source
itself and writes their pixels into a shared-memory block (no pickled pixels
through a pipe), so the calling process does no per-image work; 0 reads and
decodes in the calling process.
"""

from __future__ import annotations

import atexit
import concurrent.futures as futures
import errno
import io
import math
import multiprocessing
import os
import pickle
import sys
import uuid
import weakref
from multiprocessing import shared_memory

import numpy as np

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
EVAL_FRACTION = 0.875
SPARE = 4  # shared blocks a decoder keeps for reuse


def decode_rng(seed: int, step: int, position: int) -> np.random.Generator:
  """One image's crop and flip draws (a pure function of its seed, step and
  position in the global batch)."""
  return np.random.default_rng([int(seed), 2 << 20, int(step), int(position)])


class DecodeError(ValueError):
  """An image that cannot be decoded (named)."""


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """A random-resized crop ``(left, top, w, h)`` of a ``width x height`` image."""
  area = width * height
  log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
  for _ in range(10):
    target = area * rng.uniform(*SCALE)
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  ratio = width / height
  if ratio < RATIO[0]:
    w, h = width, round(width / RATIO[0])
  elif ratio > RATIO[1]:
    w, h = round(height * RATIO[1]), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def eval_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple]:
  """(resized (w, h), centre-crop box) of evaluation's resize + centre crop."""
  short = int(size / EVAL_FRACTION)
  if width <= height:
    w, h = short, int(short * height / width)
  else:
    w, h = int(short * width / height), short
  left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
  return (w, h), (left, top, left + size, top + size)


def decode_one(data: bytes, name: str, size: int, training: bool, seed: int, step: int,
               position: int) -> np.ndarray:
  """One image's ``(size, size, 3)`` uint8 pixels (see the module docstring).

  Raises:
    DecodeError: ``data`` is not a decodable image (naming ``name``).
  """
  from PIL import Image
  try:
    img = Image.open(io.BytesIO(data))
    img = img if img.mode == 'RGB' else img.convert('RGB')  # (convert copies even RGB)
    img.load()
  except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
    raise DecodeError(f'{name}: cannot decode the image: {type(e).__name__}: {e}') from None
  if training:
    rng = decode_rng(seed, step, position)
    left, top, w, h = crop_box(img.width, img.height, rng)
    out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
      out = out.transpose(Image.FLIP_LEFT_RIGHT)
  else:
    resized, box = eval_box(img.width, img.height, size)
    out = img.resize(resized, Image.BILINEAR).crop(box)
  return np.asarray(out, np.uint8)


def _example_name(example, dataset: str, index) -> str:
  """What an error about an example calls it: its file (image folders) or index."""
  name = example.get('name')
  return bytes(name).decode(errors='replace') if name is not None else f'{dataset} #{index}'


def _read_into(out, source, dataset, idx, positions, size, training, seed, step):
  """Reads examples ``idx`` of ``source``, decodes their images into ``out``
  and returns their labels (int32)."""
  labels = np.empty((len(idx),), np.int32)
  for j, (i, p) in enumerate(zip(idx, positions, strict=True)):
    ex = source[int(i)]  # (one at a time: a batched read's thread pool costs more here)
    out[j] = decode_one(ex['image'], _example_name(ex, dataset, i), size, training, seed, step, p)
    labels[j] = ex['label']
  return labels


_OPENED: dict = {}  # in a worker: the data sources it reads, by key (the last few)
_MAPPED: dict = {}  # in a worker: the shared blocks it has mapped, by name (the last few)


def _recent(cache: dict, key, make, keep: int, drop=None):
  """``cache[key]`` (made by ``make()`` if missing), moved to the end; the
  oldest beyond ``keep`` are dropped (``drop(value)`` first)."""
  value = cache.pop(key) if key in cache else make()
  cache[key] = value
  for old in list(cache)[:-keep]:
    gone = cache.pop(old)
    if drop is not None:
      drop(gone)
  return value


def shm_free() -> int | None:
  """Bytes free in ``/dev/shm`` (None where there is none, e.g. macOS)."""
  try:
    st = os.statvfs('/dev/shm')
  except OSError:
    return None
  return st.f_bavail * st.f_frsize


def _unmap(block):
  try:
    block.close()
  except BufferError:  # (a view still alive, e.g. in a traceback: the mapping stays)
    pass


def _work(block_name, start, shipped, dataset, idx, positions, size, training, seed, step):
  """Worker: reads and decodes examples ``idx`` into rows ``start:`` of shared
  block ``block_name`` (no pixels through a pipe); returns their labels."""
  key, pickled = shipped
  source = _recent(_OPENED, key, lambda: pickle.loads(pickled), 4)
  # Blocks are reused batch after batch: kept mapped, their pages are not
  # faulted in again.
  block = _recent(_MAPPED, block_name, lambda: shared_memory.SharedMemory(name=block_name),
                  2 * SPARE, _unmap)
  out = np.ndarray((len(idx), size, size, 3), np.uint8, block.buf,
                   offset=start * size * size * 3)
  return _read_into(out, source, dataset, idx, positions, size, training, seed, step)


class Decoder:
  """Decodes batches of encoded images, in ``workers`` processes.

  Args:
    size: the output side.
    workers: processes (0: decode in this process).
  """

  def __init__(self, size: int, workers: int = 0):
    if not (isinstance(size, int) and size >= 8):
      raise ValueError(f'image_size must be an integer >= 8, got {size!r}')
    if not (isinstance(workers, int) and workers >= 0):
      raise ValueError(f'data_workers must be an integer >= 0, got {workers!r}')
    self.size, self.workers = size, workers
    self._dropped = []  # (parts, shared block) of batches dropped before their result
    self._spare = []  # shared blocks whose batch is done, to reuse
    self._blocks = {}  # name -> every shared block made and not yet freed
    self._shipped = None  # (source, (key, pickled source)) last sent to the workers

  @property
  def pool(self):
    """The worker processes (one pool per worker count, shared by the
    training and evaluation splits; started on first use)."""
    if self.workers not in _POOLS:
      _POOLS[self.workers] = _start_pool(self.workers)
    return _POOLS[self.workers]

  def submit(self, source, idx, training: bool, seed: int = 0, step: int = 0,
             positions=None, dataset: str = ''):
    """Starts reading examples ``idx`` of ``source`` (records with an encoded
    ``image``, a ``label`` and optionally a ``name``) and decoding them; the
    workers read the records themselves, so this process only waits.

    Args:
      source: random-access records (a TFDS data source); sent to the workers
        by pickling, once.
      idx: the examples.
      training: random-resized crop + flip (else resize + centre crop).
      seed, step, positions: the draws' key (positions: in the global batch;
        default ``range(len(idx))``).
      dataset: names an example without a ``name`` in errors.
    Returns:
      A future whose ``result()`` is (the ``(len(idx), size, size, 3)`` uint8
      images, int32 labels); it raises ``DecodeError`` naming a bad image.
    """
    positions = list(range(len(idx)) if positions is None else positions)
    shape = (len(idx), self.size, self.size, 3)
    if not self.workers:
      out = np.empty(shape, np.uint8)
      labels = _read_into(out, source, dataset, idx, positions, self.size, training, seed, step)
      done = futures.Future()
      done.set_result((out, labels))
      return done
    self._sweep()
    shipped = self._ship(source, dataset)
    block = self._block(math.prod(shape) or 1)
    n = max(1, min(len(idx), 2 * self.workers))
    bounds = np.linspace(0, len(idx), n + 1).astype(int)
    parts = [self.pool.submit(_work, block.name, a, shipped, dataset, idx[a:b], positions[a:b],
                              self.size, training, seed, step)
             for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return _Joined(parts, block, shape, self)

  def _block(self, nbytes: int):
    """A shared block of at least ``nbytes``: a spare one, else a new one."""
    for block in self._spare:
      if block.size >= nbytes:
        self._spare.remove(block)
        return block
    free = shm_free()
    if free is not None and nbytes > free:  # (else a worker dies of SIGBUS writing it)
      raise OSError(errno.ENOSPC, f'/dev/shm has {free / 2**20:,.0f} MiB free and a decoded '
                    f'batch needs {nbytes / 2**20:,.0f} MiB: give the machine or container '
                    'more shared memory (docker run --shm-size=...), lower the batch size, '
                    'or set config.data_workers=0 to decode in this process')
    block = shared_memory.SharedMemory(create=True, size=nbytes)
    self._blocks[block.name] = block
    _LIVE.add(self)
    return block

  def _give_back(self, block):
    """Keeps a block no worker writes into any more for the next batch (or frees it)."""
    self._spare.append(block)
    while len(self._spare) > SPARE:
      old = self._spare.pop(0)
      del self._blocks[old.name]
      _free(old)

  def _ship(self, source, dataset):
    """(key, pickled ``source``): what the workers open it from (pickled once)."""
    if self._shipped is None or self._shipped[0] is not source:
      try:
        pickled = pickle.dumps(source)
      except Exception as e:  # noqa: BLE001 - any unpicklable part
        raise TypeError(f'{dataset}: its data source cannot be sent to decoding workers '
                        f'({type(e).__name__}: {e}); set config.data_workers=0') from e
      self._shipped = (source, (uuid.uuid4().hex, pickled))
    return self._shipped[1]

  def _sweep(self, wait: bool = False):
    """Takes back the shared blocks of batches dropped unread, once their workers are done."""
    for parts, block in list(self._dropped):
      if wait:
        _settle(parts)
      if all(p.done() for p in parts):
        self._dropped.remove((parts, block))
        self._give_back(block)

  def close(self):
    """Stops the worker processes (a later batch starts them again) and frees
    this decoder's shared blocks."""
    pool = _POOLS.pop(self.workers, None)
    if pool is not None:
      pool.shutdown(cancel_futures=True)
    self._sweep(wait=True)
    self._release()

  def _release(self):
    """Frees every shared block this decoder made (at close, when it is
    dropped, and at exit: none is left behind in /dev/shm)."""
    self._spare.clear()
    self._dropped.clear()
    while self._blocks:
      _free(self._blocks.popitem()[1])

  def __del__(self):
    self._release()


_POOLS: dict[int, futures.ProcessPoolExecutor] = {}
_LIVE = weakref.WeakSet()  # decoders holding shared blocks


@atexit.register
def _release_all():  # (runs after the pools' workers have exited)
  for decoder in list(_LIVE):
    decoder._release()


def _ready(i):
  return i


def _start_pool(workers: int) -> futures.ProcessPoolExecutor:
  """``workers`` spawned processes, started now. They import only
  ``pemn_jax.data.decode``: the caller's ``__main__`` is hidden while they
  start, so a script without an ``if __name__ == '__main__'`` guard (or
  stdin, a notebook) is not run again in each of them, as ``spawn`` would."""
  main = sys.modules['__main__']
  hidden = {k: main.__dict__.pop(k) for k in ('__file__', '__spec__') if k in main.__dict__}
  main.__spec__ = None  # spawn reads it unconditionally
  try:
    pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'))
    list(pool.map(_ready, range(workers)))  # every process is started here
  finally:
    del main.__spec__
    main.__dict__.update(hidden)
  return pool


def _settle(parts):
  """Waits until no worker writes into a batch's block any more."""
  for p in parts:
    try:
      p.exception()  # waits until the part is finished
    except futures.CancelledError:  # (never started: the pool was shut down)
      pass


def _free(block):
  block.close()
  block.unlink()


class _Joined:
  """A batch being decoded by workers into a shared block; ``result()`` copies
  it out (with the labels the workers read) and gives the block back to its
  decoder for a later batch (a batch dropped unread is taken back once its
  workers are done)."""

  def __init__(self, parts, block, shape, decoder):
    self.parts, self.block, self.shape, self.decoder = parts, block, shape, decoder

  def result(self):
    try:
      labels = np.concatenate([p.result() for p in self.parts])
      view = np.ndarray(self.shape, np.uint8, self.block.buf)
      out = view.copy()
      del view
      return out, labels
    finally:
      _settle(self.parts)
      block, self.block = self.block, None
      self.decoder._give_back(block)

  def __del__(self):
    if getattr(self, 'block', None) is not None:
      self.decoder._dropped.append((self.parts, self.block))


def default_workers() -> int:
  """Worker processes by default: the host's cores (at most 32)."""
  return max(1, min(32, os.cpu_count() or 1))
