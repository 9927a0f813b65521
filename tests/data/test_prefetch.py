"""Prefetcher: order, errors, early close, inline mode."""

import threading
import time

import pytest

from pemn_jax.data.prefetch import Prefetcher


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_batches_come_in_step_order(depth):
  seen = []

  def fn(step):
    seen.append(threading.current_thread().name)
    time.sleep(0.001 * (step % 3))  # uneven work
    return step * 10

  with Prefetcher(fn, range(5, 17), depth) as batches:
    assert list(batches) == [10 * s for s in range(5, 17)]
  on_thread = [name.startswith(Prefetcher.THREAD) for name in seen]
  assert all(on_thread) if depth else not any(on_thread)


def test_an_error_is_raised_where_its_batch_would_be():
  def fn(step):
    if step == 3:
      raise KeyError('record 3 is missing')
    return step

  with Prefetcher(fn, range(10), 2) as batches:
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match='record 3'):
      next(batches)


def test_leaving_early_stops_the_thread():
  calls = []

  def fn(step):
    calls.append(step)
    return step

  with Prefetcher(fn, range(10**9), 2) as batches:
    assert next(batches) == 0
  assert not [t for t in threading.enumerate() if t.name.startswith(Prefetcher.THREAD)]
  assert len(calls) <= 5  # the one taken, <= 2 waiting, one being put, one being built
  with pytest.raises(StopIteration):  # a closed inline prefetcher yields nothing more
    p = Prefetcher(fn, range(3), 0)
    p.close()
    next(p)


@pytest.mark.parametrize('depth', [-1, 1.5, None])
def test_bad_depth_is_named(depth):
  with pytest.raises(ValueError, match='prefetch depth'):
    Prefetcher(lambda s: s, range(3), depth)
