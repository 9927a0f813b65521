"""Computing the next batches on a background thread while the device steps.

The trainer dispatches a step asynchronously and would then build the next
batch on the Python thread; ``Prefetcher`` builds batches ``depth`` steps
ahead on one background thread instead (reading, augmenting, normalizing and
placing them on the devices), so building a batch overlaps the step wherever
spare cores exist (on 2 cores it gains little: see docs/cpu_speed.md).
Batches come out in step order, each exactly ``fn(step)``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any


class Prefetcher:
  """``fn(step)`` for each step of ``steps``, in order, computed ``depth`` ahead.

  Use as a context manager (or call ``close``): leaving it stops the thread,
  whether or not every batch was taken. An exception raised by ``fn`` is
  raised again by the ``next`` call that would have returned its batch.

  Args:
    fn: step -> batch (any value).
    steps: the steps, in the order they will be taken.
    depth: how many batches may be computed ahead; 0: no thread, each batch
      is computed when it is taken.

  Example:
    >>> with Prefetcher(lambda s: s * s, range(4), depth=2) as batches:
    ...   [next(batches) for _ in range(4)]
    [0, 1, 4, 9]
  """

  THREAD = 'pemn_jax-prefetch'

  def __init__(self, fn: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
      raise ValueError(f'prefetch depth must be an integer >= 0, got {depth!r}')
    self._fn, self._steps, self._depth, self._closed = fn, iter(steps), depth, False
    self._pending: collections.deque = collections.deque()
    self._pool = futures.ThreadPoolExecutor(1, self.THREAD) if depth else None
    self._fill()

  def _fill(self):
    while self._pool is not None and not self._closed and len(self._pending) < self._depth:
      step = next(self._steps, None)
      if step is None:
        return
      self._pending.append(self._pool.submit(self._fn, step))

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed:
      raise StopIteration
    if self._pool is None:
      return self._fn(next(self._steps))
    if not self._pending:
      raise StopIteration
    try:
      batch = self._pending.popleft().result()
    except BaseException:
      self.close()
      raise
    self._fill()
    return batch

  def close(self):
    """Stops the thread (batches computed ahead are dropped)."""
    self._closed = True
    for f in self._pending:
      f.cancel()
    self._pending.clear()
    if self._pool is not None:
      self._pool.shutdown(wait=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
