"""Wall-clock timing of training steps, shared by mmfusion and every peer so that both are
measured the same way: warm-up calls, then one synchronised call per timed step; and the
alternation of two programs in paired rounds, whose per-round ratios noise cannot fake.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

# (warm-up, timed) steps when not given: a CPU step of the tiny benchmark takes seconds, an
# accelerator step milliseconds.
DEFAULT_COUNTS = {'cpu': (2, 8)}
ACCELERATOR_COUNTS = (5, 30)


def default_counts(platform: str) -> tuple[int, int]:
  """(warmup, steps) for 'cpu' or any accelerator platform ('gpu', 'tpu', 'cuda')."""
  return DEFAULT_COUNTS.get(platform, ACCELERATOR_COUNTS)


def time_steps(step_fn: Callable[[], Any], *, warmup: int, steps: int,
               sync: Callable[[Any], Any]) -> list[float]:
  """Seconds of each of `steps` calls of `step_fn()`, after `warmup` untimed calls.

  `sync(result)` must return only once the step's work has finished on the device (JAX and
  CUDA dispatch asynchronously). It runs inside every timed step, so the host's dispatch time
  is included rather than hidden behind the previous step: the figure is a per-step latency,
  the same for every framework timed with it.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1 and warmup >= 0; got steps={steps}, warmup={warmup}')
  for _ in range(warmup):
    sync(step_fn())
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    sync(step_fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def median(seconds: list[float]) -> float:
  """The reported statistic: robust to the odd slow step (GC, a noisy neighbour on the host)."""
  return statistics.median(seconds)


def alternate(sides: Sequence[tuple[str, Callable[[], list[float]]]], *, pairs: int,
              pause_s: float = 0.5) -> dict[str, list[list[float]]]:
  """Times the sides in turn, `pairs` rounds of A B (C ...): {side: [each block's seconds]}.

  Each call `time_block()` warms its own side up before timing (the other side has just run on
  the same cores and caches). On a shared machine whose speed drifts, the drift then falls on
  both sides of a round alike, and per-round ratios cancel it where whole runs one after the
  other would not. `pause_s` between blocks lets the previous side's spinning threads sleep.
  """
  if pairs < 1:
    raise ValueError(f'need pairs >= 1; got {pairs}')
  blocks: dict[str, list[list[float]]] = {name: [] for name, _ in sides}
  for _ in range(pairs):
    for name, time_block in sides:
      time.sleep(pause_s)
      blocks[name].append(time_block())
  return blocks

