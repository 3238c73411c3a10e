r"""The accelerator checks that go with the train-step figures (benchmarks/gpu_suite.py runs them):

  python -m benchmarks.gpu_checks --config configs/benchmark.py:b16 --checks cudnn,bf16,max_batch

cudnn      the step as lowered for the config (attention 'auto') names cuDNN's fused attention
           custom call (`__cudnn$fmha...`): the fused path is really taken, not XLA's.
bf16       the loss of `--steps` training steps (each on its own synthetic batch, batch
           `--check_batch`) in bfloat16 compute against float32 with full-precision matmuls, from
           the same initial params: the largest relative difference, against `--bf16_rtol`.
max_batch  per remat policy (none, save_dots, full): the largest global batch whose step XLA
           plans within the device's memory, from a few compiled plans (the config's batch,
           twice it, then secant steps towards 97% of the memory). Nothing is run.
Writes one JSON record (--json_out). On a CPU (a dry run) memory has no limit: --memory_gib
gives one.
"""
from __future__ import annotations

import os
import re

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmfusion import cli  # noqa: E402

REMAT_POLICIES = ('none', 'save_dots', 'full')
CUDNN_ATTENTION = re.compile(r'__cudnn\$fmha\w*')


def _program(config):
  from mmfusion import sharding, train
  return train.TrainProgram(config, config.tokenizer.vocab_size, sharding.make_mesh(config.mesh))


def check_cudnn(config) -> dict:
  """Which fused-attention custom calls the lowered step names."""
  from benchmarks import mmfusion_step
  program = _program(config)
  text = program.lower_train_step(program.abstract_state_with_shardings(),
                                  mmfusion_step.abstract_batch(program, config.batch_size)).as_text()
  calls = sorted(set(CUDNN_ATTENTION.findall(text)))
  impls = sorted({stack.attention_impl for stack in mmfusion_step.tower_stacks(program)})
  return {'attention_impls': impls, 'cudnn_custom_calls': calls, 'cudnn_taken': bool(calls)}


def check_bf16(config, steps: int, batch: int, rtol: float) -> dict:
  """Losses of `steps` steps in bfloat16 against float32 (matmuls at full precision)."""
  import jax
  import numpy as np

  from benchmarks import mmfusion_step, synthetic

  losses = {}
  for dtype in ('float32', 'bfloat16'):
    run_config = mmfusion_step.config_with(config, {'model.dtype': dtype, 'batch_size': batch})
    program = _program(run_config)
    precision = 'highest' if dtype == 'float32' else 'default'
    with jax.default_matmul_precision(precision):
      state = program.init_state(run_config.seed)
      losses[dtype] = []
      for i in range(steps):
        batch_np = synthetic.synthetic_batch(run_config, batch, seed=i)
        state, metrics = program.train_step(state, jax.device_put(
            {k: batch_np[k] for k in program.expected_batch}, program.batch_sharding))
        losses[dtype].append(float(metrics['loss']))
  f32, bf16 = np.asarray(losses['float32']), np.asarray(losses['bfloat16'])
  rel = np.abs(bf16 - f32) / np.maximum(np.abs(f32), 1e-6)
  return {'steps': steps, 'batch': batch, 'losses': losses, 'max_rel_diff': float(rel.max()),
          'rtol': rtol, 'within_rtol': bool(rel.max() <= rtol)}


def device_memory_bytes(fallback_gib: float) -> tuple[int, str]:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']), 'the device allocator'
  if fallback_gib <= 0:
    raise ValueError('this device reports no memory limit; give --memory_gib (a dry run).')
  return int(fallback_gib * 2**30), '--memory_gib'


def check_max_batch(config, limit: int, probes: int = 5) -> dict:
  """Per remat policy: XLA's plans at the probed batches and the largest probed batch that
  fits. Probes follow the secant through the last two plans (plans grow about linearly in the
  batch), aimed at 97% of `limit`, in multiples of 8."""
  from benchmarks import accumulation_memory, mmfusion_step
  target = 0.97 * limit
  out = {}
  for remat in REMAT_POLICIES:
    policy_config = mmfusion_step.config_with(config, {'model.remat': remat})
    plans = {}

    def probe(batch):
      plans[batch] = accumulation_memory.plan(policy_config, 1, batch)[0]['total']
      return plans[batch]

    b1, b2 = config.batch_size, 2 * config.batch_size
    m1, m2 = probe(b1), probe(b2)
    for _ in range(probes - 2):
      if m2 == m1:
        break
      nxt = b2 + (target - m2) * (b2 - b1) / (m2 - m1)
      nxt = int(min(max(nxt, b2 / 4), b2 * 64)) // 8 * 8
      if nxt < 8 or nxt in plans:
        break
      b1, m1, b2, m2 = b2, m2, nxt, probe(nxt)
    fitting = [b for b, m in plans.items() if m <= limit]
    out[remat] = {'plans_gib': {b: m / 2**30 for b, m in sorted(plans.items())},
                  'max_batch': max(fitting) if fitting else None}
    print(f"[gpu_checks] remat={remat}: plans " + ', '.join(
        f'{b}: {m / 2**30:.1f} GiB' for b, m in sorted(plans.items())) +
        f" -> largest batch that fits {out[remat]['max_batch']}", flush=True)
  return out


def _define_flags():
  """The command line, defined only when run as a program: the checks above are importable
  next to other programs' flags (a test imports both this and train_step)."""
  return dict(
      config=config_flags.DEFINE_config_file('config', None, 'Benchmark config (configs/benchmark.py:b16).'),
      checks=flags.DEFINE_list('checks', ['cudnn', 'bf16', 'max_batch'], 'Which checks to run.'),
      steps=flags.DEFINE_integer('steps', 20, 'Training steps compared in bf16 and float32.'),
      check_batch=flags.DEFINE_integer('check_batch', 64, 'Batch of the bf16 / float32 comparison.'),
      bf16_rtol=flags.DEFINE_float('bf16_rtol', 0.02, 'Largest relative loss difference allowed.'),
      memory_gib=flags.DEFINE_float('memory_gib', 0.0, 'Device memory when the device gives none '
                                    '(a dry run on CPU).'),
      json_out=flags.DEFINE_string('json_out', '', 'Where the JSON record goes (default '
                                   'benchmarks/results/<date>_gpu_checks.json).'))


def main(args):
  import jax

  from benchmarks import environment, record
  config = args['config'].value
  checks = args['checks'].value
  rec = {'date': environment.utc_now(), 'commit': environment.git_commit(),
         'device': environment.device_description(),
         'config': record.config_label(flags.FLAGS['config'])}
  unknown = sorted(set(checks) - {'cudnn', 'bf16', 'max_batch'})
  if unknown:
    raise ValueError(f'--checks: unknown {unknown}; known: cudnn, bf16, max_batch')
  if 'cudnn' in checks:
    rec['cudnn'] = check_cudnn(config)
    print(f"[gpu_checks] cuDNN attention: {rec['cudnn']}", flush=True)
  if 'bf16' in checks:
    rec['bf16'] = check_bf16(config, args['steps'].value, args['check_batch'].value,
                             args['bf16_rtol'].value)
    print(f"[gpu_checks] bf16 vs float32 over {rec['bf16']['steps']} steps: max relative loss "
          f"difference {rec['bf16']['max_rel_diff']:.3g} (rtol {rec['bf16']['rtol']})", flush=True)
  if 'max_batch' in checks:
    limit, source = device_memory_bytes(args['memory_gib'].value)
    rec['memory_limit_bytes'], rec['memory_limit_source'] = limit, source
    rec['max_batch'] = check_max_batch(config, limit)
  path = args['json_out'].value or os.path.join(
      record.RESULTS_DIR, re.sub(r'[-:]', '', rec['date'][:19]) + 'Z_gpu_checks.json')
  record.write_json(rec, path)
  print(f'[gpu_checks] record: {path} ({jax.devices()[0].device_kind})')


if __name__ == '__main__':
  _ARGS = _define_flags()
  flags.mark_flags_as_required(['config'])
  cli.run(lambda: main(_ARGS), program='benchmarks.gpu_checks')
