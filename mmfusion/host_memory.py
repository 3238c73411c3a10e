"""The process's host-memory setting: back XLA:CPU's large temporaries with transparent huge
pages, so that a step does not spend a sixth of its time faulting its scratch memory in.

Why. XLA:CPU allocates all of a compiled program's temporaries as one block per execution, from
its worker threads (`CpuDeviceMemory` -> `posix_memalign`): 1.98 GB for the `tiny` benchmark's
train step. glibc serves a block that large with a fresh `mmap` and unmaps it when the step ends,
so every step faults every 4 KiB page in again, each zeroed by the kernel: 491k minor faults and
0.87 s of kernel time per 2.8 s step on 2 cores (benchmarks/RESULTS.md, 2026-12-06 night). With
glibc's `glibc.malloc.hugetlb=1` tunable the block is advised as huge pages: 2 MiB per fault,
~1.2k faults and 0.18 s of kernel time per step, and nothing is kept between steps. (Keeping the
freed block in the process instead, with `mallopt`, saves the faults too, but glibc's main heap
then holds a second temporary's worth of pages for good, +1.7 GB here.)

glibc reads its tunables only when a process starts, so `ensure_huge_pages()` sets
GLIBC_TUNABLES and restarts the process in place (`os.execv`: same pid, arguments, standard
streams and working directory) when the variable lacks the tunable. The restarted process puts
GLIBC_TUNABLES back as it was, so the processes it starts (a data worker, a benchmark's peer)
see the caller's own environment. `python -m mmfusion.main` and `benchmarks.train_step` call it
before anything else. Nothing happens where it cannot help or is not wanted: not Linux, glibc
older than 2.35 (the tunable's first release) or another C library, transparent huge pages set to
`never`, a GLIBC_TUNABLES that already sets glibc.malloc.hugetlb (the caller's choice stands), or
`MMFUSION_HOST_MALLOC=system`.
"""
from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = 'MMFUSION_HOST_MALLOC'
POLICIES = ('huge_pages', 'system')
TUNABLE_NAME = 'glibc.malloc.hugetlb'
TUNABLE = f'{TUNABLE_NAME}=1'
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
# Set across the restart: GLIBC_TUNABLES as the caller had it ('' when unset).
_CALLER_TUNABLES = 'MMFUSION_CALLER_GLIBC_TUNABLES'

_outcome: str | None = None      # this process's answer: asked again, it is the same


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the glibc this process runs on; None on another C library or OS."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    version = ctypes.CDLL(None).gnu_get_libc_version
  except AttributeError:           # musl and others
    return None
  version.restype = ctypes.c_char_p
  major, minor = version().decode().split('.')[:2]
  return int(major), int(minor)


def huge_pages_mode(path: str | None = None) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'); None if unknown."""
  try:
    with open(path or THP_ENABLED) as f:
      text = f.read()
  except OSError:
    return None
  chosen = [word[1:-1] for word in text.split() if word.startswith('[')]
  return chosen[0] if chosen else None


def policy() -> str:
  value = os.environ.get(ENV_VAR, 'huge_pages')
  if value not in POLICIES:
    raise ValueError(f'{ENV_VAR}={value!r}: expected one of {", ".join(POLICIES)}.')
  return value


def unavailable() -> str | None:
  """Why this machine cannot give a process huge pages through glibc; None if it can."""
  version = glibc_version()
  if version is None or version < (2, 35):
    return f'needs glibc >= 2.35 (this process: {version or "another C library"})'
  mode = huge_pages_mode()
  if mode in (None, 'never'):
    return f'transparent huge pages are off ({THP_ENABLED}: {mode})'
  return None


def reason_not_to_restart() -> str | None:
  """Why `ensure_huge_pages` would leave this process as it is; None if it would restart it."""
  if policy() == 'system':
    return f'{ENV_VAR}=system'
  if TUNABLE_NAME in os.environ.get('GLIBC_TUNABLES', ''):
    return f'GLIBC_TUNABLES already sets {TUNABLE_NAME}'
  return unavailable()


def outcome() -> str | None:
  """The line `ensure_huge_pages` returned in this process; None if it was not called."""
  return _outcome


def ensure_huge_pages() -> str:
  """Restarts this process with huge pages for large allocations unless it has them or cannot
  use them (see the module docstring); returns a line saying which. Call it first thing in an
  entry point: a restart replaces the process, and with it anything done before the call."""
  global _outcome
  if _outcome is not None:
    return _outcome
  if _CALLER_TUNABLES in os.environ:     # the restarted process: put the caller's value back
    caller = os.environ.pop(_CALLER_TUNABLES)
    if caller:
      os.environ['GLIBC_TUNABLES'] = caller
    else:
      os.environ.pop('GLIBC_TUNABLES', None)
    _outcome = f'host memory: huge pages for large allocations ({TUNABLE})'
    return _outcome
  reason = reason_not_to_restart()
  if reason is not None:
    _outcome = f'host memory: the C library\'s defaults ({reason})'
    return _outcome
  caller = os.environ.get('GLIBC_TUNABLES', '')
  os.environ[_CALLER_TUNABLES] = caller
  os.environ['GLIBC_TUNABLES'] = f'{caller}:{TUNABLE}' if caller else TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  raise AssertionError('unreachable: os.execv returns only by raising')


def ensure_huge_pages_or_exit(program: str) -> str:
  """`ensure_huge_pages` for a command's `__main__`: a bad MMFUSION_HOST_MALLOC ends the command
  with one line naming it, before anything has run."""
  try:
    return ensure_huge_pages()
  except ValueError as e:
    sys.exit(f'{program}: {e}')
