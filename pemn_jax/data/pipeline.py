"""A deterministic, resumable input pipeline over a random-access source.

Batch ``step`` is a pure function of ``(seed, step)``: epoch ``e`` visits the
examples in the order ``permutation(seed, e)``; augmentation draws for the
*global* batch come from ``(seed, step)``, and each process keeps its slice of
the global batch. So a resumed run (only ``step`` is saved) sees the same
batches, and 1 or many processes/devices see the same global batch.
Variable-size datasets (``Dataset.decoder``) are decoded in worker processes
(``pemn_jax.data.decode``), the next batch while this one trains.
"""

from __future__ import annotations

import numpy as np

from pemn_jax.data import augment as aug
from pemn_jax.data.sources import Dataset

IN_MEMORY_LIMIT = 2 << 30  # bytes: smaller splits are read into memory once
AHEAD = 2  # variable-size datasets: batches decoded ahead of the one asked for


def _fetch(source, keys):
  """Records by key: one batched read where the source supports it."""
  try:
    return source.__getitems__(keys)
  except TypeError:  # sources without a working batched read (e.g. TFDS's mock)
    return [source[k] for k in keys]


def _records(source, idx, chunk: int = 4096):
  """The records of examples ``idx``, read ``chunk`` at a time."""
  for s in range(0, len(idx), chunk):
    yield from _fetch(source, [int(i) for i in idx[s:s + chunk]])


class Pipeline:
  """Training batches (``batch(step)``) and evaluation batches (``eval_batches()``)."""

  def __init__(self, ds: Dataset, global_batch: int, seed: int, augment='',
               process_index: int = 0, process_count: int = 1, limit: int | None = None,
               augment_options=None, training: bool = True):
    if global_batch % process_count:
      raise ValueError(f'batch_size {global_batch} is not divisible by the {process_count} '
                       'processes')
    self.ds, self.global_batch, self.seed = ds, global_batch, int(seed)
    self.ops = aug.parse(augment)  # ValueError naming an unknown op
    self.augment_options = dict(augment_options or {})
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = global_batch // process_count
    self.num_examples = ds.num_examples if limit is None else min(limit, ds.num_examples)
    if training and self.num_examples < global_batch:  # (evaluation pads its last batch)
      raise ValueError(f'{ds.name}: {self.num_examples} training examples < one batch of '
                       f'{global_batch}')
    self.steps_per_epoch = self.num_examples // global_batch
    self._images = self._labels = None
    self._order = None  # (epoch, order)
    self._pending = {}  # variable-size datasets: step -> (decoding batch, labels)
    nbytes = self.num_examples * int(np.prod(ds.image_shape))
    if nbytes <= IN_MEMORY_LIMIT and ds.decoder is None:
      self._images, self._labels = self._read(np.arange(self.num_examples))

  def _read(self, idx):
    if self._images is not None:
      return self._images[idx], self._labels[idx]
    images = np.empty((len(idx), *self.ds.image_shape), np.uint8)
    labels = np.empty((len(idx),), np.int32)
    for j, ex in enumerate(_records(self.ds.source, idx)):
      images[j] = ex['image']
      labels[j] = ex['label']
    return images, labels

  def _submit(self, idx, training: bool, step: int = 0, positions=None):
    """Starts reading and decoding examples ``idx``: a future of (uint8 images, labels)."""
    return self.ds.decoder.submit(self.ds.source, idx, training, self.seed, step, positions,
                                  self.ds.name)

  def _decoded(self, step: int):
    """Training batch ``step`` of a variable-size dataset, decoded (and the
    next ``AHEAD`` started)."""
    for s in range(step, step + AHEAD + 1):
      if s not in self._pending:
        idx, positions = self._batch_indices(s)
        self._pending[s] = self._submit(idx, True, s, positions)
    for s in [s for s in self._pending if s < step or s > step + AHEAD]:
      del self._pending[s]  # a jump (resume, evaluation): drop what is not needed
    return self._pending.pop(step).result()

  def _batch_indices(self, step: int):
    """(example indices, positions in the global batch) of this process's
    slice of batch ``step``."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    idx = self.order(epoch)[i * self.global_batch:(i + 1) * self.global_batch]
    sl = self._local_slice()
    return idx[sl], range(sl.start, sl.stop)

  def close(self):
    """Stops the decoding workers (variable-size datasets)."""
    self._pending.clear()
    if self.ds.decoder is not None:
      self.ds.decoder.close()

  def _local_slice(self) -> slice:
    """This process's part of a global batch."""
    lo = self.process_index * self.local_batch
    return slice(lo, lo + self.local_batch)

  def normalize(self, images, boxes=None):
    """``augment.normalize`` with this dataset's mean and std (numpy, or jax
    inside a jitted step: the trainer ships uint8 and normalizes there)."""
    return aug.normalize(images, self.ds.mean, self.ds.std, boxes)

  def order(self, epoch: int) -> np.ndarray:
    """The examples of ``epoch`` in visiting order (the last epoch's is kept:
    drawing a permutation of 60k costs ~0.5 ms, as much as the rest of a batch)."""
    cached = self._order
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples))
      cached[1].flags.writeable = False
      self._order = cached
    return cached[1]

  def examples(self, idx):
    """Examples ``idx`` (of this pipeline's ``num_examples``), not augmented:
    (images f32 NHWC, normalized; labels i32)."""
    if self.ds.decoder is not None:
      images, labels = self._submit(np.asarray(idx), False).result()
      return self.normalize(images), labels
    images, labels = self._read(np.asarray(idx))
    return self.normalize(images), labels

  def raw_batch(self, step: int):
    """This process's slice of global batch ``step`` before normalization:
    (uint8 images NHWC, int32 labels, erase boxes: None, or (N, 4) int32 for
    ``normalize``). A batch is a pure function of (seed, step)."""
    idx, positions = self._batch_indices(step)
    images, labels = (self._decoded(step) if self.ds.decoder is not None else
                      self._read(idx))
    if set(self.ops) - {'erase'}:
      images = aug.augment_uint8(images, self.ops, self.seed, step, positions,
                                 self.augment_options)
    boxes = None
    if 'erase' in self.ops:
      p = float(self.augment_options.get('erase', aug.DEFAULTS['erase']))
      boxes = aug.erase_boxes(len(images), images.shape[1:], self.seed, step, positions, p)
    return images, labels, boxes

  def batch(self, step: int):
    """This process's slice of global batch ``step``: (images f32 NHWC,
    normalized on the host; labels i32)."""
    images, labels, boxes = self.raw_batch(step)
    return self.normalize(images, boxes), labels

  def eval_batches(self):
    """Every example once, in order, this process's slices of global batches;
    yields (uint8 images, labels, weights) with the last batch padded (weight
    0). Evaluation steps normalize them (``normalize``)."""
    n, b, sl = self.num_examples, self.global_batch, self._local_slice()
    batches = [np.minimum(np.arange(start, start + b), n - 1)[sl] for start in range(0, n, b)]
    ahead = None  # variable-size datasets: the next batch decodes while this one is used
    for k, start in enumerate(range(0, n, b)):
      weights = (np.arange(start, start + b) < n).astype(np.float32)[sl]
      if self.ds.decoder is None:
        yield (*self._read(batches[k]), weights)
        continue
      future = ahead or self._submit(batches[k], False)
      ahead = self._submit(batches[k + 1], False) if k + 1 < len(batches) else None
      yield (*future.result(), weights)

