r"""Memory of the training step with gradient accumulation (config.accum_steps) at one global batch.

  python -m benchmarks.accumulation_memory --config configs/benchmark.py:tiny \
      [--accum 1,2,4,8] [--batch N] [--no_record] [--results_md PATH] [--json_out PATH]

Owns lowering and compiling the real train step (`train.TrainProgram`) from abstract state and
batch at each accum_steps, and reading XLA's memory plan for one device
(`environment.compiled_memory`): nothing runs, so batches beyond the machine's memory can be
planned. Temporaries are what accumulation shrinks (the towers' activations of one micro-batch
instead of the batch's); arguments (parameters, optimizer state, the batch) stay. The config
must carry its vocabulary size (configs/benchmark.py does; the shapes configs learn theirs
from the data).
"""
from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks import environment, record  # noqa: E402

SECTION = record.ACCUMULATION_MEMORY_SECTION
COLUMNS = ('Date (UTC)', 'Machine', 'Commit', 'Config', 'Global batch', 'accum_steps',
           'Micro-batch', 'Temp MiB/device', 'Total MiB/device', 'Temp vs k=1', 'Compile s')
_INTRO = ('`python -m benchmarks.accumulation_memory --config CONFIG`: XLA\'s memory plan for one '
          'device of the whole train step (forward, backward, optimizer update) at one global '
          'batch, with `config.accum_steps` = k: the towers run in k micro-batches and the loss '
          'on the whole batch (mmfusion/accumulate.py), the same step as k = 1. Nothing is run. '
          'Total = arguments + outputs + temporaries - donated.')


def plan(config, accum_steps: int, batch: int) -> tuple[dict[str, int], float]:
  """(XLA's per-device memory plan, compile seconds) of the train step at `accum_steps`."""
  import time

  import jax

  from benchmarks import mmfusion_step
  from mmfusion import config as config_lib
  from mmfusion import sharding, train
  config = mmfusion_step.config_with(config, {'batch_size': batch, 'accum_steps': accum_steps})
  config_lib.validate(config, num_devices=jax.device_count())
  program = train.TrainProgram(config, config.tokenizer.vocab_size,
                               sharding.make_mesh(config.mesh))
  start = time.perf_counter()
  compiled = program.lower_train_step(program.abstract_state_with_shardings(),
                                      mmfusion_step.abstract_batch(program, batch)).compile()
  seconds = time.perf_counter() - start
  memory = environment.compiled_memory(compiled)
  if memory is None:
    raise RuntimeError('XLA gives no memory analysis on this platform.')
  return memory, seconds


def sweep(config, accums: list[int], batch: int) -> dict[str, Any]:
  if not accums or any(k < 1 or batch % k for k in accums):
    raise ValueError(f'--accum={accums}: give accum_steps >= 1 that divide the batch ({batch}).')
  import jax
  rows, base = [], None
  for k in accums:
    memory, seconds = plan(config, k, batch)
    base = base or (memory if k == 1 else None)
    rows.append({'accum_steps': k, 'micro_batch': batch // k, 'memory': memory,
                 'compile_s': seconds,
                 'temp_vs_1': None if base is None else memory['temp'] / max(base['temp'], 1)})
    print(f"  k={k:>3} micro-batch {batch // k:>6}: temp {memory['temp'] / 2**20:10.2f} MiB, "
          f"total {memory['total'] / 2**20:10.2f} MiB per device, compiled in {seconds:.1f} s",
          flush=True)
  first = jax.devices()[0]
  machine = dict(environment.device_description(), platform=first.platform,
                 device_kind=first.device_kind, device_count=jax.device_count())
  return {'batch': batch, 'machine': environment.describe(machine), 'results': rows}


def _mib(n: int) -> str:
  return f'{n / 2**20:.2f}'


def main(flag_values: Any, config_flag: Any) -> None:
  config = config_flag.value
  try:
    accums = [int(k) for k in flag_values.accum]
    result = sweep(config, accums, flag_values.batch or config.batch_size)
  except ValueError as e:
    sys.exit(f'benchmarks.accumulation_memory: {e}')
  label = record.config_label(flag_values['config'])
  result.update(commit=environment.git_commit(), date=environment.utc_now(), config=label)
  json_path = flag_values.json_out or record.default_json_path(
      {'date': result['date'], 'config': 'accumulation_memory'})
  print(f'  record: {record.write_json(result, json_path)}')
  if not flag_values.no_record:
    for r in result['results']:
      record.append_row(flag_values.results_md, SECTION, COLUMNS, [
          record.table_date(result['date']), result['machine'], result['commit'], label,
          result['batch'], r['accum_steps'], r['micro_batch'], _mib(r['memory']['temp']),
          _mib(r['memory']['total']),
          'n/a' if r['temp_vs_1'] is None else f"{r['temp_vs_1']:.2f}x",
          f"{r['compile_s']:.1f}"], intro=_INTRO)
    print(f'  recorded in {os.path.relpath(flag_values.results_md)}')


def _define_flags() -> tuple[Any, Any]:
  # Defined only when run as a program, so that tests can import this module.
  from absl import flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'An experiment config, e.g. configs/benchmark.py:tiny.', lock_config=True)
  flags.DEFINE_list('accum', ['1', '2', '4', '8'], 'accum_steps values; 1 first (the baseline).')
  flags.DEFINE_integer('batch', 0, 'Global batch size; 0 keeps config.batch_size.', lower_bound=0)
  flags.DEFINE_bool('no_record', False, 'Do not append rows to the results file.')
  flags.DEFINE_string('results_md', record.RESULTS_MD, 'The markdown results file.')
  flags.DEFINE_string('json_out', '', 'Where the JSON record goes (default: '
                      'benchmarks/results/<date>_accumulation_memory.json).')
  return flags.FLAGS, config_flag


if __name__ == '__main__':
  from mmfusion import cli
  FLAGS, CONFIG = _define_flags()
  cli.run(lambda: main(FLAGS, CONFIG), program='benchmarks.accumulation_memory')
