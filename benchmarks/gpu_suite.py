r"""Every accelerator measurement of the B/16 benchmark, in two parts that each fit one device call
(about 10 minutes): each program in a process of its own, so that one failing leaves the others'
figures, and each starts with the device's memory free.

  python -m benchmarks.gpu_suite --part 1 --out DIR    # vs open_clip, cuDNN, bf16 vs float32
  python -m benchmarks.gpu_suite --part 2 --out DIR    # remat / attention / scan, largest batch
  python -m benchmarks.gpu_suite --part 1 --dry_run --out DIR --peer_python PY   # CPU, tiny shapes

Part 1: `benchmarks.train_step` on configs/benchmark.py:b16 against open_clip (3 paired rounds);
`benchmarks.gpu_checks` cudnn and bf16. Part 2: train_step with remat none / save_dots / full,
attention xla, scan (no peer; step time and device peak memory each); gpu_checks max_batch.
Each train_step appends its row to DIR/RESULTS_rows.md (copy them into benchmarks/RESULTS.md)
and writes its JSON to DIR; a summary of what ran and its exit status goes to DIR/suite.json.

On the device image (no TensorFlow, ml-collections or open_clip), carry their wheels
(ml_collections, open_clip_torch, ftfy, wcwidth) and install them first, as RESULTS.md says.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import environment

B16 = 'configs/benchmark.py:b16'
# The dry run: the same programs on a shape a CPU runs in seconds.
DRY = 'configs/benchmark.py:tiny,depth=1,batch=16'
DRY_OVERRIDES = ['--config.data.image_size=32', '--config.tokenizer.max_len=16']


def programs(part: int, dry_run: bool, out: str, peer_python: str) -> list[tuple[str, list[str]]]:
  """(name, argv) of every program of `part`."""
  config = DRY if dry_run else B16
  extra = DRY_OVERRIDES if dry_run else []
  timing = ['--steps', '2', '--warmup', '1'] if dry_run else ['--steps', '20', '--warmup', '5']
  rows = ['--results_md', os.path.join(out, 'RESULTS_rows.md')]

  def train_step(name, arg='', peer=('--peer', 'none')):
    return (name, ['-m', 'benchmarks.train_step', '--config', config + arg, *extra, *timing,
                   *peer, *rows, '--json_out', os.path.join(out, f'train_step_{name}.json')])

  def checks(name, which, *flags):
    return (name, ['-m', 'benchmarks.gpu_checks', '--config', config, *extra, '--checks', which,
                   *flags, '--json_out', os.path.join(out, f'gpu_checks_{name}.json')])

  if part == 1:
    peer = ['--peer', 'open_clip', '--pairs', '3']
    if peer_python:
      peer += ['--peer_python', peer_python]
    return [train_step('vs_open_clip', peer=peer),
            checks('cudnn_bf16', 'cudnn,bf16', *(['--steps', '3', '--check_batch', '8']
                                                 if dry_run else []))]
  return [train_step('remat_none', ',remat=none'),
          train_step('remat_save_dots', ',remat=save_dots'),
          train_step('remat_full', ',remat=full'),
          train_step('attention_xla', ',attention=xla'),
          train_step('scan', ',scan'),
          checks('max_batch', 'max_batch', *(['--memory_gib', '1'] if dry_run else []))]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--part', type=int, choices=(1, 2), required=True)
  parser.add_argument('--out', required=True, help='Folder for the JSON records and rows.')
  parser.add_argument('--dry_run', action='store_true', help='Tiny shapes, on any device.')
  parser.add_argument('--peer_python', default='', help="The open_clip peer's interpreter.")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  summary = []
  for name, argv_ in programs(args.part, args.dry_run, os.path.abspath(args.out),
                              args.peer_python):
    print(f'[gpu_suite] {name}: python {" ".join(argv_)}', flush=True)
    start = time.perf_counter()
    status = subprocess.run([sys.executable, *argv_], cwd=environment.REPO_ROOT).returncode
    summary.append({'name': name, 'argv': argv_, 'exit_status': status,
                    'seconds': round(time.perf_counter() - start, 1)})
    print(f"[gpu_suite] {name}: exit {status} after {summary[-1]['seconds']} s", flush=True)
  with open(os.path.join(args.out, 'suite.json'), 'w') as f:
    json.dump({'part': args.part, 'dry_run': args.dry_run, 'date': environment.utc_now(),
               'commit': environment.git_commit(), 'programs': summary}, f, indent=2)
  return 0 if all(s['exit_status'] == 0 for s in summary) else 1


if __name__ == '__main__':
  sys.exit(main())
