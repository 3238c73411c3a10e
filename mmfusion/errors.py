"""One line for every error of a run, whenever it happens: the handler around `mmfusion.main`.

Whatever stops a run (a config value, the data, a checkpoint, an evaluator, a save, or a bug)
reaches the user as one line, `mmfusion: <cause>` (a mismatch adds its diff below), and the
exit code 1. The full traceback, and whatever a library printed while failing, go to
`<workdir>/error.log`; `--verbose` prints them too.

Errors the user can act on are ValueError / OSError and their subclasses (CheckpointError,
WorkdirInUse, ...): their message is the line. Anything else is a bug of ours or a library's:
its type and first line are shown.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import traceback
from typing import Iterator

ERROR_LOG = 'error.log'


class RunFailed(Exception):
  """The run ended with its checkpoint written, but something in it failed (an evaluator):
  already reported in the log; the exit code says so."""


def describe(error: BaseException) -> str:
  """The line (or lines, for a diff) the user sees for `error`."""
  if _users_to_fix(error):
    text = str(error).strip() or type(error).__name__
    return text if not isinstance(error, OSError) or error.filename is None else (
        f'{error.strerror or text}: {error.filename}')
  first = (str(error).strip().splitlines() or [''])[0]
  return f'{type(error).__name__}: {first}' if first else type(error).__name__


def write_log(error: BaseException, workdir: str | None) -> str:
  """Appends `error`'s traceback (and its `details`, what a library printed while failing) to
  the workdir's error log (a temporary file when the workdir does not exist); returns its path."""
  if workdir and os.path.isdir(workdir):
    path = os.path.join(workdir, ERROR_LOG)
  else:
    path = os.path.join(tempfile.gettempdir(), f'mmfusion-error-{os.getpid()}.log')
  with open(path, 'a') as f:
    f.write(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} pid {os.getpid()}\n')
    f.write(''.join(traceback.format_exception(error)))
    details = getattr(error, 'details', '')
    if details:
      f.write(f'--- output captured while it failed:\n{details}\n')
  return path


@contextlib.contextmanager
def one_line(program: str, workdir: str | None, verbose: bool = False) -> Iterator[None]:
  """Runs the body; an exception becomes `program: <cause>` on stderr and exit code 1."""
  try:
    yield
  except (SystemExit, KeyboardInterrupt):
    raise
  except BaseException as error:  # noqa: BLE001 (every error gets its one line)
    log_path = write_log(error, workdir and os.path.abspath(os.path.expanduser(workdir)))
    if verbose:
      traceback.print_exception(error)
      details = getattr(error, 'details', '')
      if details:
        print(details, file=sys.stderr)
    line = describe(error)
    if verbose or _users_to_fix(error):
      sys.exit(f'{program}: {line}')
    sys.exit(f'{program}: {line} [an error of mmfusion or a library: traceback in {log_path}]')


def _users_to_fix(error: BaseException) -> bool:
  return isinstance(error, (ValueError, OSError, RunFailed))


@contextlib.contextmanager
def captured_output(grace_s: float = 0.0) -> Iterator[io.StringIO]:
  """Collects what Python code prints to stderr in the body (and, when the body raises, for
  `grace_s` more seconds): a library's tracebacks from its own threads (tensorstore's, under
  orbax, when a checkpoint is damaged) are kept for the error log, not shown."""
  buffer, real = io.StringIO(), sys.stderr
  sys.stderr = buffer
  try:
    yield buffer
  except BaseException:
    time.sleep(grace_s)
    raise
  finally:
    sys.stderr = real
