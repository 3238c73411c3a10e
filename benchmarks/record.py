"""Where results go: a row per run in a section's table of `benchmarks/RESULTS.md` (the train
step's row and every table's date and config cells are built here), and the full record as JSON.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from ml_collections import config_flags

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(BENCHMARKS_DIR, 'RESULTS.md')
RESULTS_DIR = os.path.join(BENCHMARKS_DIR, 'results')

TRAIN_STEP_SECTION = 'Train step'
COMPILE_TIME_SECTION = 'Compile time'
PIPELINE_SECTION = 'Input pipeline'
CONTRASTIVE_MEMORY_SECTION = 'Contrastive loss memory'
ACCUMULATION_MEMORY_SECTION = 'Gradient accumulation memory'
# What a new RESULTS.md starts with; each section then follows with its own intro and table.
PREAMBLE = f"""\
# Benchmark results

Measured results of the programs in `benchmarks/`, one table per benchmark. Each row is
appended by the command named in its section, with the UTC date, the machine (JAX platform,
device kind and count, CPU cores usable by the process) and the commit (`+dirty`: tracked
files differed from it). Rows are only ever added; `--json_out PATH` keeps a run's full record
(the train step always writes one, under `benchmarks/results/`).

- {TRAIN_STEP_SECTION}: `python -m benchmarks.train_step --config CONFIG` times one training step
  on a synthetic batch (FLOPs, MFU, memory), against open_clip's step.
- {COMPILE_TIME_SECTION}: `python -m benchmarks.compile_time --config CONFIG --depths 6,24` times
  lowering and compiling the train step at each depth, scan vs unrolled.
- {PIPELINE_SECTION}: `python -m benchmarks.pipeline --config CONFIG` times the training input
  iterator alone (tf.data, tokenization, copy to device), no model.
- {CONTRASTIVE_MEMORY_SECTION}: `python -m benchmarks.contrastive_memory` plans the per-device
  memory of the sharded contrastive losses' gradient step against the global batch size.
- {ACCUMULATION_MEMORY_SECTION}: `python -m benchmarks.accumulation_memory --config CONFIG`
  plans the train step's per-device memory at one global batch for each `config.accum_steps`.
"""

TRAIN_STEP_INTRO = """\
`python -m benchmarks.train_step --config CONFIG`: one row per run. Step time is the median
over the timed steps; examples/s = batch / median step. TFLOP/step are model FLOPs (no remat
recomputation) from XLA's cost analysis of the step `as run`, or `unrolled`: the same config
lowered without scan, remat and fused attention, which XLA would undercount or overcount.
MFU = achieved FLOP/s / peak, against a square matmul measured in the same run and against
the vendor's dense datasheet peak (n/a where unknown, e.g. CPUs). Peak memory: the device
allocator's high-water mark, or on CPU the process's max RSS with XLA's plan for the step
(arguments + outputs + temporaries - donated). open_clip ran the same architecture, batch and
precision with its own training step (`benchmarks/peers/open_clip_step.py`). From 2026-12-06
the two are alternated in rounds (open_clip's block, then mmfusion's, each warmed up first):
step times are the median of the blocks' medians, and mmfusion/open_clip is the median of the
per-round ratios, with the number of rounds and the lowest and highest ratio."""
TRAIN_STEP_COLUMNS = (
    'Date (UTC)', 'Machine', 'Commit', 'Config', 'Batch', 'Step ms', 'Examples/s', 'Compile s',
    'TFLOP/step', 'TFLOP/s', 'MFU (matmul)', 'MFU (datasheet)', 'Peak memory',
    'open_clip examples/s', 'mmfusion/open_clip')


def _gib(n: int | None) -> str:
  return 'n/a' if n is None else f'{n / 2**30:.2f} GiB'


def _pct(x: float | None) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def table_date(iso_date: str) -> str:
  """'2026-01-02 03:04' for environment.utc_now()'s '2026-01-02T03:04:05+00:00': the Date (UTC)
  cell of every table."""
  return iso_date[:16].replace('T', ' ')


def config_overrides(config_flag: Any) -> list[str]:
  """The command line's `--config.k=v` overrides, sorted, in a form the flag parses again."""
  return [f'--config.{key}={value}'
          for key, value in sorted(config_flags.get_override_values(config_flag).items())]


def config_label(config_flag: Any) -> str:
  """'configs/x.py:arg --config.k=v ...': the config as the command line gave it."""
  return ' '.join([config_flags.get_config_filename(config_flag), *config_overrides(config_flag)])


def memory_summary(memory: dict[str, Any]) -> str:
  if memory.get('device_peak_bytes') is not None:
    return f"{_gib(memory['device_peak_bytes'])} device"
  parts = []
  if memory.get('host_max_rss_bytes') is not None:
    parts.append(f"{_gib(memory['host_max_rss_bytes'])} host RSS")
  if memory.get('xla'):
    parts.append(f"XLA {_gib(memory['xla']['total'])}")
  return '; '.join(parts) or 'n/a'


def table_row(record: dict[str, Any]) -> list[str]:
  """The train-step table's cells (TRAIN_STEP_COLUMNS) for one run record (see
  train_step.build_record)."""
  peer = record.get('peer')
  source = 'as run' if record['flops_source'].endswith('of this config') else 'unrolled'
  return [
      table_date(record['date']),
      record['device_summary'],
      record['commit'],
      f"`{record['config_label']}`",
      str(record['batch_size']),
      f"{1e3 * record['median_step_s']:.1f}",
      f"{record['examples_per_sec']:.1f}",
      f"{record['lower_s'] + record['compile_s']:.1f}",
      f"{record['flops_per_step'] / 1e12:.4g} ({source})",
      f"{record['achieved_flops_per_sec'] / 1e12:.4g}",
      _pct(record['mfu_vs_matmul']),
      _pct(record['mfu_vs_datasheet']),
      memory_summary(record['memory']),
      'n/a' if peer is None else f"{peer['examples_per_sec']:.1f}",
      _ratio_cell(record),
  ]


def _ratio_cell(record: dict[str, Any]) -> str:
  """'1.18', or with paired rounds '1.18 (5 rounds, 1.10-1.25)': the median of the per-round
  ratios, then their count and range."""
  if record.get('ratio_vs_peer') is None:
    return 'n/a'
  cell = f"{record['ratio_vs_peer']:.2f}"
  if len(record.get('pair_ratios') or ()) > 1:
    cell += (f" ({len(record['pair_ratios'])} rounds, {record['ratio_min']:.2f}-"
             f"{record['ratio_max']:.2f})")
  return cell


def _table_line(cells) -> str:
  return '| ' + ' | '.join(str(c).replace('|', '\\|') for c in cells) + ' |'


def append_row(path: str, section: str, columns: Sequence[str], row: Sequence[Any],
               intro: str = '') -> None:
  """Adds `row` as the last row of the table under '## {section}' in the markdown file `path`.

  A missing file starts with PREAMBLE; a missing section is added at the end, with `intro`
  and the table header. Every other line is kept as it was, so rows land in their table even
  when other sections follow it. A table whose header is not `columns` is an error, never
  misaligned rows. The file is replaced atomically.
  """
  if len(row) != len(columns):
    raise ValueError(f'a row of {len(row)} cells for the {len(columns)} columns {columns}')
  header, line = _table_line(columns), _table_line(row)
  lines = PREAMBLE.splitlines()
  if os.path.exists(path):
    with open(path) as f:
      lines = f.read().splitlines()
  title = f'## {section}'
  stripped = [l.rstrip() for l in lines]
  if title not in stripped:
    while lines and not lines[-1].strip():
      lines.pop()
    lines += ['', title, ''] + ([*intro.splitlines(), ''] if intro else []) + [
        header, _table_line(['---'] * len(columns)), line]
  else:
    start = stripped.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(('# ', '## '))),
               len(lines))
    table = [i for i in range(start + 1, end) if lines[i].lstrip().startswith('|')]
    if not table:
      while end > start + 1 and not lines[end - 1].strip():
        end -= 1
      lines[end:end] = ['', header, _table_line(['---'] * len(columns)), line]
    elif lines[table[0]].strip() != header:
      raise ValueError(f'{path}: the table under "{title}" has the header '
                       f'{lines[table[0]].strip()!r}, not {header!r}; move the old table under '
                       'another heading, then record again.')
    else:
      lines.insert(table[-1] + 1, line)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):   # a failed write leaves the old file and no stray copy
      os.remove(tmp)


def append_train_step(record: dict[str, Any], path: str = RESULTS_MD) -> None:
  append_row(path, TRAIN_STEP_SECTION, TRAIN_STEP_COLUMNS, table_row(record), TRAIN_STEP_INTRO)


def default_json_path(record: dict[str, Any]) -> str:
  """results/<UTC date-time>_<config file stem>-<argument>.json"""
  stamp = re.sub(r'[-:]', '', record['date'][:19])
  name = re.sub(r'[^A-Za-z0-9_.=-]+', '-', os.path.basename(record['config']).replace('.py', ''))
  return os.path.join(RESULTS_DIR, f'{stamp}Z_{name.strip("-")}.json')


def write_json(record: dict[str, Any], path: str) -> str:
  """Writes `record` as indented JSON (what JSON cannot hold, as str) and returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=2, default=str)
    f.write('\n')
  return path
