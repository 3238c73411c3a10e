"""Command line: `python -m mmfusion.main --config configs/X.py[:arg] --workdir DIR [--config.k=v]`.

Flags -> locked config -> `train.run(config, workdir)`. Re-running on a workdir resumes it.
"""
from __future__ import annotations

import os

# TensorFlow only feeds data; keep its start-up chatter out of the user's terminal.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmfusion import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/shapes_clip.py[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and metrics go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main():
  from mmfusion import train  # heavy imports after flag parsing, so --help is instant
  final = train.run(_CONFIG.value, _WORKDIR.value)
  print('[mmfusion] final: ' + ', '.join(f'{k}={v:.4f}' for k, v in sorted(final.items())))


if __name__ == '__main__':
  cli.run(main, program='mmfusion')
