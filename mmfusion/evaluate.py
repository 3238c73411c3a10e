r"""Evaluate a trained run's checkpoint, with its own evaluators or with another config's.

  python -m mmfusion.evaluate --workdir workdirs/shapes_clip \
      [--evals_from configs/shapes_adversarial.py] [--names robustness] [--step N] [--json OUT]

`--evals_from` takes the evaluators of another config file (`path[:argument]`), e.g. to measure
the default run with the robustness evaluator of the adversarial fine-tuning config, so that both
rows of a comparison come from one evaluator. Prints one line per metric (and writes them as JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def evaluate(workdir: str, *, evals_from: str = '', names: Sequence[str] = (),
             step: int | None = None, data_dir: str | None = None) -> dict[str, float]:
  from mmfusion import api
  from mmfusion import config as config_lib
  run = api.load_run(workdir, step=step, data_dir=data_dir)
  if evals_from:
    path, _, arg = evals_from.partition(':')
    other = config_lib.load_file(path, arg or None)
    run.config.unlock()
    run.config.evals = other.evals
    run.config.lock()
  return run.evaluate(list(names) or None)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m mmfusion.evaluate',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--evals_from', default='', help='a config file whose evals to run')
  parser.add_argument('--names', default='', help='comma-separated evaluator names (default all)')
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--json', default='', help='also write the metrics here')
  args = parser.parse_args(argv)
  from mmfusion import api
  try:
    results = evaluate(args.workdir, evals_from=args.evals_from, step=args.step,
                       names=[n for n in args.names.split(',') if n], data_dir=args.data_dir)
  except (api.RunError, ValueError, FileNotFoundError) as e:
    print(f'mmfusion.evaluate: {e}', file=sys.stderr)
    return 1
  for key, value in results.items():
    print(f'{key} = {value:.4f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
