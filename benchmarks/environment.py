"""Where and when a benchmark ran: device, commit, UTC date, and the memory it used
(device peak, XLA's plan for the compiled step, host high-water mark).
"""
from __future__ import annotations

import datetime
import os
import resource
import subprocess
import sys
from typing import TYPE_CHECKING, Any

# jax is imported where it is used: the open_clip worker counts cores with this module, and
# a process holding both torch and jaxlib aborts.
if TYPE_CHECKING:
  import jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def utc_now() -> str:
  """'2026-01-02T03:04:05+00:00': every record's date (tables show it as record.table_date)."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def git_commit(root: str = REPO_ROOT) -> str:
  """Short hash of HEAD, with '+dirty' when a tracked file differs from it; 'unknown' outside git.

  Untracked files and benchmarks/RESULTS.md are ignored: recording a result (a new JSON file,
  a row) changes nothing that was measured, and would otherwise mark every later run dirty.
  """
  def git(*args):
    return subprocess.run(['git', *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout
  try:
    commit = git('rev-parse', '--short', 'HEAD').strip()
    status = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  changed = [line[3:].strip('"') for line in status.splitlines()]
  changed = [path for path in changed if path != 'benchmarks/RESULTS.md']
  return commit + ('+dirty' if changed else '')


def cpu_cores() -> int:
  """The cores this process may run on (a container or taskset may allow fewer than exist)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def device_description() -> dict[str, Any]:
  import jax
  devices = jax.devices()
  return {
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'cpu_cores': cpu_cores(),
      'jax_version': jax.__version__,
  }


def describe(device: dict[str, Any]) -> str:
  """One line, e.g. 'gpu NVIDIA H100 80GB HBM3 x1, 16 CPU cores'."""
  kind = device['device_kind']
  name = device['platform'] if kind == device['platform'] else f"{device['platform']} {kind}"
  return f"{name} x{device['device_count']}, {device['cpu_cores']} CPU cores"


def device_peak_bytes() -> int | None:
  """Largest allocation high-water mark over the local devices (GPU/TPU); None on CPU,
  whose devices keep no allocator statistics."""
  import jax
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
  """XLA's memory plan for one device. `total` = arguments + outputs + temporaries - aliased
  bytes: donated inputs share their buffers with the outputs, so those count once."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  out = {name: int(getattr(analysis, f'{name}_size_in_bytes'))
         for name in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def host_max_rss_bytes() -> int:
  """The process's resident-set high-water mark (everything: Python, TensorFlow, buffers)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == 'darwin' else rss * 1024   # Linux reports KiB
