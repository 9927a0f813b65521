"""Computing the next batches on a background thread while the device steps.

The trainer dispatches a step asynchronously and would then build the next
batch on the Python thread; ``Prefetcher`` builds batches ``depth`` steps
ahead on one background thread instead (reading, augmenting, normalizing
and placing them on the devices), so building a batch overlaps the step
wherever spare cores exist (on 2 cores it gains little: see
docs/cpu_speed.md). Batches come out in step order, each exactly
``fn(step)``: what the trainer computes is unchanged.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

_DONE = object()


class Prefetcher:
  """``fn(step)`` for each step of ``steps``, in order, computed ``depth`` ahead.

  Use as a context manager (or call ``close``): leaving it stops the thread,
  whether or not every batch was taken. An exception raised by ``fn`` is
  raised again by the ``next`` call that would have returned its batch.

  Args:
    fn: step -> batch (any value).
    steps: the steps, in the order they will be taken.
    depth: how many batches may wait ready; 0: no thread, each batch is
      computed when it is taken.

  Example:
    >>> with Prefetcher(lambda s: s * s, range(4), depth=2) as batches:
    ...   [next(batches) for _ in range(4)]
    [0, 1, 4, 9]
  """

  def __init__(self, fn: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
    if not isinstance(depth, int) or depth < 0:
      raise ValueError(f'prefetch depth must be an integer >= 0, got {depth!r}')
    self._fn, self._steps = fn, iter(steps)
    self._stop = threading.Event()
    self._thread = None
    if depth:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._work, name='pemn_jax-prefetch', daemon=True)
      self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _work(self):
    try:
      for step in self._steps:
        if not self._put((self._fn(step), None)):
          return
    except BaseException as e:  # handed to the consumer, raised there
      self._put((None, e))
      return
    self._put((_DONE, None))

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      if self._stop.is_set():
        raise StopIteration
      return self._fn(next(self._steps))
    while True:
      try:
        item, error = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError('the prefetch thread ended without a batch') from None
    if error is not None:
      self.close()
      raise error
    if item is _DONE:
      raise StopIteration
    return item

  def close(self):
    """Stops the thread (batches computed ahead are dropped)."""
    self._stop.set()
    while self._thread is not None and self._thread.is_alive():
      try:  # unblock a producer waiting on a full queue
        self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
