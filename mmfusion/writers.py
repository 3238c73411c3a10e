"""Where metrics go: TensorBoard event files and a JSON-lines file in the workdir, both flushed
at every write, so that TensorBoard and `tail -f` show a run as it goes.

Only process 0 writes; other processes get a writer that does nothing, so callers never
branch on the process index.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax

from mmfusion import event_file


class MetricWriter:
  """Writes scalars to `<workdir>/tb` (TensorBoard) and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = event_file.EventFileWriter(os.path.join(workdir, 'tb'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._tb.write(step, {k: v for k, v in clean.items() if math.isfinite(v)})
    self._tb.flush()
    self._jsonl.write(json.dumps({'step': step, **clean}) + '\n')

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
