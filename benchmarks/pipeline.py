r"""Input-pipeline throughput: how fast the trainer's own batch iterator runs, with no model.

  python -m benchmarks.pipeline --config configs/shapes_clip.py [--config.k=v] \
      [--batches 200] [--warmup 10] [--step_examples_per_sec X] [--no_record] [--json_out PATH]

Owns timing `mmfusion.data.training.batches`, built as `train.Trainer.run` builds it;
the machine, commit and date come from environment.py, the row and JSON from record.py.
"""
from __future__ import annotations

import os
import time
from typing import Any

# TensorFlow only feeds data; keep its start-up chatter out of the report.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402

from benchmarks import environment, record  # noqa: E402

COLUMNS = ('Date (UTC)', 'Machine', 'Commit', 'Config', 'Batch', 'Examples/s',
           'ms/batch median', 'ms/batch p90')
_INTRO = ('`python -m benchmarks.pipeline --config CONFIG`: the training iterator alone '
          '(tf.data, tokenization, copy to device), no model. Compare with the train '
          "step's examples/s: below it, the input pipeline is the bottleneck.")


def time_pipeline(config: Any, num_batches: int, warmup: int) -> dict[str, Any]:
  """Times `num_batches` batches of the training iterator after `warmup` untimed ones.

  Each batch is waited for until its arrays are on the device, so the host-to-device copy
  counts. The first batch (tokenizer, dataset decode into memory) is reported apart as
  startup_s and is always one of the warm-up batches.
  """
  if num_batches < 1 or warmup < 1:
    raise ValueError(f'--batches={num_batches} and --warmup={warmup} must both be >= 1 (the '
                     'first batch includes the set-up and is never timed).')
  import jax
  from mmfusion import sharding
  from mmfusion.data import sources
  from mmfusion.data import training

  start = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh)
  if config.batch_size % sharding.data_parallel_size(mesh):
    raise ValueError(f'config.batch_size = {config.batch_size} must be divisible by the '
                     f'data-parallel size {sharding.data_parallel_size(mesh)} of the mesh.')
  source = sources.Source(config)
  batches = training.batches(source, sharding.batch_sharding(mesh), start_step=0)
  jax.block_until_ready(next(batches))
  startup_s = time.perf_counter() - start
  for _ in range(warmup - 1):
    jax.block_until_ready(next(batches))

  seconds = []
  start = time.perf_counter()
  for _ in range(num_batches):
    t0 = time.perf_counter()
    jax.block_until_ready(next(batches))
    seconds.append(time.perf_counter() - t0)
  elapsed = time.perf_counter() - start

  batches_per_sec = num_batches / elapsed
  return {
      'batch': config.batch_size,
      'batches': num_batches,
      'warmup': warmup,
      'steps_per_epoch': training.steps_per_epoch(source),
      'startup_s': startup_s,
      'seconds': elapsed,
      'batches_per_sec': batches_per_sec,
      'examples_per_sec': config.batch_size * batches_per_sec,
      'ms_per_batch_median': 1e3 * float(np.median(seconds)),
      'ms_per_batch_p90': 1e3 * float(np.percentile(seconds, 90)),
  }


def _report(result: dict[str, Any], step_examples_per_sec: float) -> str:
  lines = [
      f"{result['config']}: batch {result['batch']}, {result['batches']} batches timed after "
      f"{result['warmup']} warm-up ({result['steps_per_epoch']} per epoch), "
      f"first batch after {result['startup_s']:.1f} s",
      f"  {result['batches_per_sec']:.2f} batches/s = {result['examples_per_sec']:.0f} "
      f"examples/s; ms/batch median {result['ms_per_batch_median']:.1f}, "
      f"p90 {result['ms_per_batch_p90']:.1f}",
      f"  {result['machine']}, commit {result['commit']}",
  ]
  if step_examples_per_sec:
    headroom = result['headroom']
    verdict = ('the pipeline keeps up' if headroom >= 1 else
               'the input pipeline is the bottleneck')
    lines.append(f'  train step consumes {step_examples_per_sec:.0f} examples/s: headroom '
                 f'{headroom:.2f}x ({verdict})')
  return '\n'.join(lines)


def main(flag_values: Any) -> None:
  config_flag = flag_values['config']
  result = time_pipeline(config_flag.value, flag_values.batches, flag_values.warmup)
  result.update(config=record.config_label(config_flag),
                machine=environment.describe(environment.device_description()),
                commit=environment.git_commit(), date=environment.utc_now())
  step_rate = flag_values.step_examples_per_sec
  if step_rate:
    result['step_examples_per_sec'] = step_rate
    result['headroom'] = result['examples_per_sec'] / step_rate
  print(_report(result, step_rate), flush=True)
  if flag_values.json_out:
    record.write_json(result, flag_values.json_out)
  if not flag_values.no_record:
    record.append_row(record.RESULTS_MD, record.PIPELINE_SECTION, COLUMNS, [
        record.table_date(result['date']), result['machine'], result['commit'],
        f"`{result['config']}`", result['batch'], f"{result['examples_per_sec']:.0f}",
        f"{result['ms_per_batch_median']:.1f}", f"{result['ms_per_batch_p90']:.1f}"],
        intro=_INTRO)
    print(f'  recorded in {os.path.relpath(record.RESULTS_MD)}')


def _define_flags() -> Any:
  # Defined only when run as a program, so that tests can import this module without a
  # clash over flag names.
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      'config', None, 'Experiment config, e.g. configs/shapes_clip.py[:arg].', lock_config=True)
  flags.DEFINE_integer('batches', 200, 'Batches timed.')
  flags.DEFINE_integer('warmup', 10, 'Batches pulled before timing, the first one included.')
  flags.DEFINE_float('step_examples_per_sec', 0.0,
                     "The train step's examples/s (benchmarks/train_step.py); > 0 prints "
                     'the headroom ratio pipeline / step.')
  flags.DEFINE_bool('no_record', False, 'Do not append a row to benchmarks/RESULTS.md.')
  flags.DEFINE_string('json_out', '', 'Also write the result as JSON to this path.')
  flags.mark_flags_as_required(['config'])
  return flags.FLAGS


if __name__ == '__main__':
  from mmfusion import cli
  FLAGS = _define_flags()
  cli.run(lambda: main(FLAGS), program='benchmarks.pipeline')
