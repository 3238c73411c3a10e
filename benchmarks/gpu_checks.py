r"""The accelerator checks that go with the train-step figures (benchmarks/gpu_suite.py runs them):

  python -m benchmarks.gpu_checks --config configs/benchmark.py:b16 --checks cudnn,bf16,max_batch

cudnn      the step as lowered for the config (attention 'auto') names cuDNN's fused attention
           custom call (`__cudnn$fmha...`): the fused path is really taken, not XLA's. Where
           cuDNN is absent (a dry run), the step is lowered with attention 'cudnn' in bfloat16
           instead, XLA's kernel standing in for cuDNN's, and every call's operands go through
           the checks jax's cuDNN wrapper makes when it traces: a call they refuse is a step
           that would fail to lower on the GPU.
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
CUDNN_VERSION = 91000   # what cudnn_refusal assumes (only packed / MLA attention depend on it)


def _program(config):
  from mmfusion import sharding, train
  return train.TrainProgram(config, config.tokenizer.vocab_size, sharding.make_mesh(config.mesh))


def check_cudnn(config) -> dict:
  """Which fused-attention custom calls the lowered step names; off GPUs also
  `check_cudnn_operands`."""
  import jax

  from benchmarks import mmfusion_step
  program = _program(config)
  text = program.lower_train_step(program.abstract_state_with_shardings(),
                                  mmfusion_step.abstract_batch(program, config.batch_size)).as_text()
  calls = sorted(set(CUDNN_ATTENTION.findall(text)))
  impls = sorted({stack.attention_impl for stack in mmfusion_step.tower_stacks(program)})
  out = {'attention_impls': impls, 'cudnn_custom_calls': calls, 'cudnn_taken': bool(calls)}
  if jax.default_backend() != 'gpu':
    out['operand_checks'] = check_cudnn_operands(config)
  return out


def cudnn_refusal(query, key, value, mask) -> str | None:
  """Why jax's cuDNN wrapper would refuse to trace this training call (its own checks: layout,
  dtypes, the bias a mask becomes, flash attention's shapes), or None."""
  import inspect

  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  bias = None if mask is None else cudnn_fa.combine_bias_and_mask(None, mask, query.dtype)
  given = dict(query=query, key=key, value=value, bias=bias,
               layout=cudnn_fa.AttentionLayout.BTNH)
  try:
    cudnn_fa.check_layout(**{name: given.get(name)
                             for name in inspect.signature(cudnn_fa.check_layout).parameters})
    cudnn_fa.check_is_flash_attention(query, key, value, cudnn_fa.AttentionLayout.BTNH.value,
                                      CUDNN_VERSION, has_bias=bias is not None, is_training=True)
  except (ValueError, NotImplementedError) as refusal:
    return f'{type(refusal).__name__}: {refusal}'
  return None


def check_cudnn_operands(config) -> dict:
  """The step lowered with every tower's attention 'cudnn' in bfloat16, XLA's kernel standing in
  for cuDNN's behind `jax.nn.dot_product_attention`: each cuDNN call's shapes and
  `cudnn_refusal`. For machines without cuDNN, where the real lowering cannot run."""
  import jax

  from benchmarks import mmfusion_step
  fused = jax.nn.dot_product_attention
  calls = []

  def stand_in(query, key, value, bias=None, mask=None, *, implementation=None, **kwargs):
    if implementation == 'cudnn':
      calls.append({'query': list(query.shape), 'key': list(key.shape),
                    'mask': None if mask is None else list(mask.shape),
                    'refusal': cudnn_refusal(query, key, value, mask)})
      implementation = 'xla'
    return fused(query, key, value, bias, mask, implementation=implementation, **kwargs)

  run_config = mmfusion_step.config_with(
      config, {'model.attention': 'cudnn', 'model.dtype': 'bfloat16'})
  jax.nn.dot_product_attention = stand_in
  try:
    program = _program(run_config)      # builds the model's shapes: attention runs here too
    calls.clear()
    program.lower_train_step(program.abstract_state_with_shardings(),
                             mmfusion_step.abstract_batch(program, run_config.batch_size))
  finally:
    jax.nn.dot_product_attention = fused
  return {'calls': calls, 'refused': sum(c['refusal'] is not None for c in calls)}


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
    operands = rec['cudnn'].get('operand_checks')
    print('[gpu_checks] cuDNN attention: ' + str({k: v for k, v in rec['cudnn'].items()
                                                   if k != 'operand_checks'}), flush=True)
    if operands:
      print(f"[gpu_checks] cuDNN's checks on the step's {len(operands['calls'])} attention calls "
            f"(bfloat16, attention 'cudnn'): {operands['refused']} refused", flush=True)
      for call in operands['calls']:
        if call['refusal']:
          print(f"[gpu_checks]   refused q {call['query']} k {call['key']} mask {call['mask']}: "
                f"{call['refusal']}", flush=True)
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
  if rec.get('cudnn', {}).get('operand_checks', {}).get('refused'):
    raise SystemExit('[gpu_checks] cuDNN would refuse attention calls of this step (above): '
                     'on a GPU it would fail to lower')


if __name__ == '__main__':
  _ARGS = _define_flags()
  flags.mark_flags_as_required(['config'])
  cli.run(lambda: main(_ARGS), program='benchmarks.gpu_checks')
