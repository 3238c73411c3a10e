"""Command-line plumbing shared by `python -m mmfusion.main` and the benchmarks: absl flags with
an ml_collections `--config`, whose parse errors become one line naming the culprit.
"""
from __future__ import annotations

import re
import sys

from absl import flags


def parse_flags(argv: list[str], program: str) -> list[str]:
  """Turns flag-parsing failures (unknown --config.key, bad config file) into one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
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
