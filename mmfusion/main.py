"""Command line: `python -m mmfusion.main --config configs/X.py[:arg] --workdir DIR [--config.k=v]`.

Flags -> locked config -> `train.run(config, workdir)`. Re-running on a workdir resumes it.
"""
from __future__ import annotations

import os
import re
import sys

# TensorFlow only feeds data; keep its start-up chatter out of the user's terminal.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/shapes_clip.py[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and metrics go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # TFDS logs every file it touches at INFO
  from mmfusion import train  # heavy imports after flag parsing, so --help is instant
  final = train.run(_CONFIG.value, _WORKDIR.value)
  print('[mmfusion] final: ' + ', '.join(f'{k}={v:.4f}' for k, v in sorted(final.items())))


def _friendly_flag_errors(argv):
  """Turns flag-parsing failures (unknown --config.key, bad config file) into one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'mmfusion: {e}')
  except (AttributeError, KeyError) as e:
    # ml_collections reports an unknown override key as a bare AttributeError("'key' Did you
    # mean ...?"), with escaping that varies; pull out the key and the suggestion.
    text = str(e)
    key = re.match(r'\W*(\w+)', text).group(1) if re.match(r'\W*(\w+)', text) else text
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    culprits = [a for a in argv if a.startswith('--config.') and key in a.split('=')[0].split('.')]
    sys.exit(f'mmfusion: unknown config key {key!r} in {culprits or "the --config.* overrides"}'
             + (f' (did you mean {suggestion.group(1)!r}?)' if suggestion else '')
             + '. Every settable key is defined in mmfusion/config.py.')


if __name__ == '__main__':
  app.run(main, flags_parser=_friendly_flag_errors)
