"""Command-line plumbing shared by `python -m mmfusion.main` and the benchmarks: absl flags with
an ml_collections `--config`, whose parse errors become one line naming the culprit.
"""
from __future__ import annotations

import functools
import re
import sys
from typing import Callable

from absl import app, flags, logging


def run(main: Callable[[], None], program: str) -> None:
  """absl's `app.run` for a command that takes flags only: flag and config errors as one line
  starting with `program`, absl logging at WARNING (TFDS logs every file it touches at INFO),
  then `main()`."""
  def entry(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.WARNING)
    main()
  app.run(entry, flags_parser=functools.partial(parse_flags, program=program))


def parse_flags(argv: list[str], program: str) -> list[str]:
  """Turns flag-parsing failures (unknown --config.key, bad config file) into one line."""
  try:
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None:
      # config_flags defers a file that failed to load to the first use of the config; use
      # it here, so that the failure is one line rather than a traceback from deep in a run.
      flags.FLAGS['config'].value.keys()
    return remaining
  except flags.Error as e:
    # An exception inside a config file arrives with its whole traceback in the message;
    # the first line names the flag, the last one the cause.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    sys.exit(f'{program}: ' + (lines[0] if len(lines) < 2 else f'{lines[0]} {lines[-1]}'))
  except OSError as e:
    detail = [l.strip() for l in str(e).splitlines() if l.strip()]
    sys.exit(f'{program}: cannot load the --config file: {detail[-1] if detail else e}')
  except ValueError as e:   # a config file's own check, e.g. an unknown config argument
    sys.exit(f'{program}: {e}')
  except (AttributeError, KeyError) as e:
    # ml_collections reports an unknown override key as a bare AttributeError("'key' Did you
    # mean ...?"), with escaping that varies; pull out the key and the suggestion.
    text = str(e)
    key = re.match(r'\W*(\w+)', text).group(1) if re.match(r'\W*(\w+)', text) else text
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    culprits = [a for a in argv if a.startswith('--config.') and key in a.split('=')[0].split('.')]
    sys.exit(f'{program}: unknown config key {key!r} in {culprits or "the --config.* overrides"}'
             + (f' (did you mean {suggestion.group(1)!r}?)' if suggestion else '')
             + '. Every settable key is defined in mmfusion/config.py.')
