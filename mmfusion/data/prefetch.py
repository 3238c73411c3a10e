"""Threaded prefetch: items of an iterator produced on a background thread, kept `size` ahead."""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterator


class _Failure:
  """An exception raised by the producer thread, carried to the consumer to be re-raised."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def prefetch(iterator: Iterator[Any], size: int) -> Iterator[Any]:
  """Items of `iterator` in order, produced on a background thread that keeps up to `size`
  ready (in training: batches already transferred to device).

  The host work of the next batches (tf.data, tokenization, the copy to device) overlaps the
  running step instead of sitting between steps; the trainer's data_wait_fraction measures
  what is left. An error in the producer is re-raised in the consumer at the same position.
  Closing the consumer stops the thread.
  """
  if size <= 0:
    yield from iterator
    return
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
      put(_Failure(e))

  thread = threading.Thread(target=produce, name='mmfusion-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join(timeout=10)
