"""One run per workdir: an advisory lock file, `<workdir>/.lock`.

The lock is an `fcntl.flock` on the file, held for as long as the run's process lives: the
kernel drops it when the process ends, however it ends (kill -9 included). The file records who
took it (pid, host, time), so a second run is refused with the first one named, and a file left
behind by a killed run is recognised as stale (nobody holds its lock) and taken over.

flock is per host: two runs on one workdir from two machines over a network file system are not
detected (NFS may or may not forward flock). Multi-process runs take the lock in process 0 only.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_FILE = '.lock'


class WorkdirInUse(ValueError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """`acquire()` takes the lock of `workdir` (made if missing) or raises WorkdirInUse;
  `release()` (or the process's end) gives it back."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None
    self.stale_owner: dict | None = None     # who held a stale lock this one took over

  def acquire(self) -> 'WorkdirLock':
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    # 'a+': open without truncating, so the owner's record survives until the lock is ours.
    f = open(self.path, 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read(f)
      f.close()
      raise WorkdirInUse(
          f'workdir {os.path.dirname(self.path)} is in use by another run ({describe(owner)}); '
          'wait for it to end or stop it, or give this run another --workdir.') from None
    self.stale_owner = _read(f) or None     # a record nobody holds: its process has ended
    f.seek(0)
    f.truncate()
    json.dump({'pid': os.getpid(), 'host': socket.gethostname(),
               'since': time.strftime('%Y-%m-%d %H:%M:%S')}, f)
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      self._file.truncate(0)        # a record left behind means a run that did not end cleanly
      self._file.flush()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  @property
  def held(self) -> bool:
    return self._file is not None


def _read(f) -> dict:
  f.seek(0)
  try:
    return json.loads(f.read() or '{}')
  except json.JSONDecodeError:
    return {}


def describe(owner: dict | None) -> str:
  """'pid 123 on host, since ...': a lock's (former) owner, for messages."""
  if not owner:
    return 'owner unknown'
  return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"
