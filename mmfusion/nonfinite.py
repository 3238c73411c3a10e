"""Non-finite training steps (config.train.nonfinite): the flag each step carries in its
metrics (`nonfinite`: 1.0 when a loss or the gradient norm is NaN / Inf), and what the loop does
with the steps it has run since it last looked.

'stop': `stop_if_any` raises NonFinite naming the first such step, the losses that went
non-finite and the last checkpoint; the loop calls it before every save, so every checkpoint is
from before that step and none is rotated away for a later one. 'skip': the step itself kept
the params and optimizer state (train.TrainProgram), and `count` counts such steps.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

MODES = ('stop', 'skip')
FLAG = 'nonfinite'              # the metric each step reports

Pending = Sequence[tuple[int, dict[str, Any]]]     # (step, its metrics on device)


class NonFinite(ValueError):
  """A step's loss or gradients were NaN / Inf under config.train.nonfinite = 'stop'."""


def count(pending: Pending) -> int:
  """How many of `pending` were non-finite (one host sync for all of them)."""
  return int(sum(jax.device_get([m[FLAG] for _, m in pending]))) if pending else 0


def stop_if_any(pending: Pending, *, last_checkpoint: str | None, lr: float) -> None:
  """Raises NonFinite for the first non-finite step of `pending`, if any."""
  if not count(pending):
    return
  step, metrics = next((s, m) for s, m in pending if jax.device_get(m[FLAG]))
  values = jax.device_get(metrics)
  names = sorted(k for k, v in values.items() if k != FLAG and not np.isfinite(v).all())
  losses, others = [k for k in names if 'loss' in k], [k for k in names if 'loss' not in k]
  raise NonFinite(
      f'step {step}: non-finite {", ".join(losses or others)}'
      + (f' (and {", ".join(others)})' if losses and others else '') + '; stopped without saving '
      '(config.train.nonfinite=stop). Last checkpoint, from before it: '
      + (last_checkpoint or 'none (no checkpoint was written before it)')
      + f'. Lower config.optim.lr (now {lr:g}) or raise warmup, or set '
      'config.train.nonfinite=skip to drop such updates.')
