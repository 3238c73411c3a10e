"""How a peer framework's training step is timed from the benchmark: in a process of its own
that builds the step once and then times blocks of steps on request, so that the benchmark can
alternate the peer with mmfusion (A B A B ...) while each keeps its own warm state.

Worker side: `serve(step, sync, info)` answers commands on stdin. Benchmark side:
`PeerProcess` starts a worker module under any Python interpreter (the peer may live in a
virtual environment of its own) and sends it the commands. Messages are JSON lines on the
worker's stdout, prefixed by MARKER; the worker's other output passes through to the terminal,
so its warnings and errors are seen as they are. Only the standard library is imported here:
workers import neither JAX nor mmfusion (see open_clip_worker.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

from benchmarks import timing

MARKER = '@@benchmark-peer '


def say(message: dict[str, Any]) -> None:
  """One protocol message on stdout (worker side)."""
  sys.stdout.write(MARKER + json.dumps(message) + '\n')
  sys.stdout.flush()


def serve(step: Callable[[], Any], sync: Callable[[Any], Any], ready: dict[str, Any],
          info: Callable[[], dict[str, Any]]) -> None:
  """Worker side: announces `ready`, then per command line on stdin
  {"op": "time", "warmup": W, "steps": N} -> {"event": "timed", "step_seconds": [...]}
  {"op": "close"} -> {"event": "closed", **info()} and returns (so does the end of stdin)."""
  say({'event': 'ready', **ready})
  for line in sys.stdin:
    command = json.loads(line)
    if command['op'] == 'time':
      seconds = timing.time_steps(step, warmup=command['warmup'], steps=command['steps'],
                                  sync=sync)
      say({'event': 'timed', 'step_seconds': seconds})
    elif command['op'] == 'close':
      say({'event': 'closed', **info()})
      return
    else:
      raise ValueError(f'unknown peer command {command!r}')


class PeerFailed(RuntimeError):
  pass


class PeerProcess:
  """Benchmark side: `python -m <module> <directory>` under `python`, run from `cwd`.

  `ready` holds what the worker announced once its step was built (device, params, ...);
  `time(warmup, steps)` returns the seconds of each timed step; `close()` the worker's final
  info. A worker that exits or says something unexpected raises PeerFailed naming `name`.
  """

  def __init__(self, name: str, module: str, directory: str, *, python: str, cwd: str):
    self.name = name
    # The worker's stdout is read here (protocol lines) and echoed (everything else); stderr
    # goes straight to the terminal. Unbuffered, so messages arrive when they are written.
    self._process = subprocess.Popen(
        [python, '-u', '-m', module, directory], cwd=cwd, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    self.ready = self._expect('ready')

  def _expect(self, event: str) -> dict[str, Any]:
    for line in self._process.stdout:
      if not line.startswith(MARKER):
        sys.stdout.write(line)
        continue
      message = json.loads(line[len(MARKER):])
      got = message.pop('event', None)
      if got != event:
        self._fail(f'expected {event!r}, got {got!r} {message!r}')
      return message   # the event's figures, without the protocol's 'event' key
    self._fail('ended without a reply')

  def _fail(self, what: str):
    self._process.kill()
    status = self._process.wait()
    raise PeerFailed(f'the {self.name} peer {what} (exit status {status}); its output is above. '
                     'Pass --peer none to benchmark mmfusion alone.')

  def _send(self, command: dict[str, Any]) -> None:
    try:
      self._process.stdin.write(json.dumps(command) + '\n')
      self._process.stdin.flush()
    except BrokenPipeError:
      self._fail('exited')

  def time(self, *, warmup: int, steps: int) -> list[float]:
    self._send({'op': 'time', 'warmup': warmup, 'steps': steps})
    return self._expect('timed')['step_seconds']

  def close(self) -> dict[str, Any]:
    self._send({'op': 'close'})
    info = self._expect('closed')
    self._process.stdin.close()
    self._process.wait()
    return info

  def kill(self) -> None:
    if self._process.poll() is None:
      self._process.kill()
      self._process.wait()

  def __enter__(self) -> 'PeerProcess':
    return self

  def __exit__(self, *exc) -> None:
    self.kill()
