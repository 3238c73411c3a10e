"""Stopping a run cleanly on SIGINT / SIGTERM: the signal sets a flag, the training loop saves a
checkpoint at the next step boundary (several processes: the next log step, agreed among them)
and exits with 128 + the signal's number. A second signal interrupts at once (a wedged run).
"""
from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class Interrupt:
  """A context in which SIGINT / SIGTERM are caught; `agreed(at_log_step)` says when to stop."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self) -> 'Interrupt':
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    when = ('the next step boundary' if jax.process_count() == 1 else
            'the next log step (where all processes agree to stop)')
    print(f'\n[mmfusion] {signal.Signals(signum).name} received: saving a checkpoint at {when}, '
          'then stopping (signal again to stop at once).', flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, at_log_step: bool) -> int | None:
    """The signal to stop on, decided at the same step by every process.

    One process stops at the next step boundary. Several processes must save the same step
    together (the save is collective), and a signal reaches them at different steps, so
    they compare flags at log steps only, where the loop already waits for the devices.
    """
    if jax.process_count() == 1:
      return self.signum
    if not at_log_step:
      return None
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(flags)) or None
