r"""Training-step benchmark: mmfusion's step, its model FLOPs and MFU, against open_clip's step on the
same architecture, batch and precision. Appends a row to benchmarks/RESULTS.md.

  python -m benchmarks.train_step --config configs/benchmark.py:tiny                 # CPU
  python -m benchmarks.train_step --config configs/benchmark.py:b16 --steps 30       # GPU
  python -m benchmarks.train_step --config configs/benchmark.py:tiny,scan --config.model.remat=full

Flags: --steps / --warmup (defaults: 8 / 2 on CPU, 30 / 5 on accelerators), --batch N
(overrides config.batch_size), --peer open_clip|none, --peer_compile (torch.compile the peer;
off by default: eager is how open_clip trains unless asked), --no_record (skip RESULTS.md),
--json_out PATH (default benchmarks/results/<date>_<config>.json), --matmul_size N.
The batch is synthetic and lives on the device: the figures are for the step alone, no input
pipeline. The peer runs first, in a process of its own (see benchmarks/peers/open_clip_worker.py),
then mmfusion's step is compiled and timed, then a square matmul for the measured peak.
"""
from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import record as record_lib  # noqa: E402
from mmfusion import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Benchmark config, e.g. configs/benchmark.py:tiny (any experiment config works).',
    lock_config=True)
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps (default 8 on CPU, 30 on accelerators).',
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', None, 'Untimed steps after compiling (default 2 on CPU, '
                               '5 on accelerators).', lower_bound=0)
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch size; 0 keeps config.batch_size.',
                              lower_bound=0)
_PEER = flags.DEFINE_enum('peer', 'open_clip', ['open_clip', 'none'],
                          'Peer timed on the same shapes (open_clip needs the [bench] extra).')
_PEER_COMPILE = flags.DEFINE_bool('peer_compile', False, 'Wrap the peer model in torch.compile.')
_NO_RECORD = flags.DEFINE_bool('no_record', False, 'Do not append a row to RESULTS.md.')
_RESULTS_MD = flags.DEFINE_string('results_md', record_lib.RESULTS_MD, 'The markdown results file.')
_JSON_OUT = flags.DEFINE_string('json_out', '', 'Where the full JSON record goes '
                                '(default benchmarks/results/<date>_<config>.json).')
_MATMUL_SIZE = flags.DEFINE_integer('matmul_size', 0, 'Side of the square matmul timed for the '
                                    'measured peak; 0: 2048 on CPU, 8192 on accelerators.',
                                    lower_bound=0)
flags.mark_flags_as_required(['config'])


def config_label() -> str:
  """The config as typed: path:arg plus every --config.* override (and --batch)."""
  label = record_lib.config_label(flags.FLAGS['config'])
  return label + (f' --batch {_BATCH.value}' if _BATCH.value else '')


def _ratio(a, b):
  return None if a is None or not b else a / b


def build_record(*, config, label, date, commit, device, device_summary, mmfusion, matmul,
                 datasheet_per_device, arithmetic, peer) -> dict:
  """One run as a flat JSON-able dict; every derived figure is computed here, once."""
  n = device['device_count']
  examples_per_sec = config.batch_size / mmfusion['median_step_s']
  achieved = mmfusion['flops_per_step'] / mmfusion['median_step_s']
  matmul_peak = matmul['per_device_flops_per_sec'] * n
  datasheet_peak = None if datasheet_per_device is None else datasheet_per_device * n
  out = {
      'date': date, 'commit': commit, 'device': device,
      'device_summary': device_summary,
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'overrides': dict(config_flags.get_override_values(flags.FLAGS['config'])),
      'config_label': label,
      'batch_size': config.batch_size, 'compute_dtype': config.model.dtype,
      **{k: v for k, v in mmfusion.items() if k != 'memory'},
      'examples_per_sec': examples_per_sec,
      'achieved_flops_per_sec': achieved,
      'matmul': matmul,
      'matmul_peak_flops_per_sec': matmul_peak,
      'datasheet_arithmetic': arithmetic,
      'datasheet_peak_flops_per_sec': datasheet_peak,
      'mfu_vs_matmul': achieved / matmul_peak,
      'mfu_vs_datasheet': _ratio(achieved, datasheet_peak),
      'memory': mmfusion['memory'],
      'peer': None,
      'ratio_vs_peer': None,
  }
  if peer is not None:
    peer = dict(peer)
    peer['examples_per_sec'] = config.batch_size / peer['median_step_s']
    peer['achieved_flops_per_sec'] = mmfusion['flops_per_step'] / peer['median_step_s']
    peer['flops_note'] = ("mmfusion's model FLOPs per step: the architecture is the same, so the "
                          'maths per step is too (up to the small differences the peer lists)')
    out['peer'] = peer
    out['ratio_vs_peer'] = examples_per_sec / peer['examples_per_sec']
  return out


def summary(rec: dict) -> str:
  mm = rec['mfu_vs_matmul']
  ds = rec['mfu_vs_datasheet']
  lines = [
      f"[benchmark] {rec['config_label']}  batch {rec['batch_size']}  {rec['compute_dtype']}",
      f"  on {rec['device_summary']}, commit {rec['commit']}, {rec['date']}",
      f"  mmfusion : {1e3 * rec['median_step_s']:.1f} ms/step (median of {len(rec['step_seconds'])}),"
      f" {rec['examples_per_sec']:.1f} examples/s; lower {rec['lower_s']:.1f} s + compile "
      f"{rec['compile_s']:.1f} s",
      f"  FLOPs    : {rec['flops_per_step'] / 1e12:.4g} TFLOP/step ({rec['flops_source']}) -> "
      f"{rec['achieved_flops_per_sec'] / 1e12:.4g} TFLOP/s",
      f"  MFU      : {100 * mm:.1f}% of the measured matmul peak "
      f"({rec['matmul_peak_flops_per_sec'] / 1e12:.4g} TFLOP/s, {rec['matmul']['dtype']} "
      f"{rec['matmul']['size']}^2); datasheet: "
      + ('n/a (no datasheet peak for this device)' if ds is None else
         f"{100 * ds:.1f}% of {rec['datasheet_peak_flops_per_sec'] / 1e12:.4g} TFLOP/s "
         f"({rec['datasheet_arithmetic']})"),
      f"  memory   : {record_lib.memory_summary(rec['memory'])}",
  ]
  peer = rec['peer']
  if peer is None:
    lines.append('  peer     : none')
  else:
    lines.append(
        f"  open_clip: {1e3 * peer['median_step_s']:.1f} ms/step, {peer['examples_per_sec']:.1f} "
        f"examples/s, {peer['achieved_flops_per_sec'] / 1e12:.4g} TFLOP/s at mmfusion's FLOPs/step "
        f"({'torch.compile' if peer['compiled'] else 'eager'}, {peer['precision']}, {peer['device']})")
    lines.append(f"  mmfusion/open_clip = {rec['ratio_vs_peer']:.2f}x (examples/s)")
  return '\n'.join(lines)


def main():
  # Heavy imports after flag parsing, so --help and flag errors are instant.
  import jax
  from benchmarks import environment, flops, mmfusion_step, synthetic, timing

  config = _CONFIG.value
  if _BATCH.value:
    config.batch_size = _BATCH.value
  date, commit, label = environment.utc_now(), environment.git_commit(), config_label()
  batch_np = synthetic.synthetic_batch(config, config.batch_size, seed=config.seed)

  peer = None
  if _PEER.value == 'open_clip':
    from benchmarks.peers import open_clip_step
    # The peer runs first, in its own process, before JAX starts a backend here: on a GPU,
    # JAX's client reserves most of the memory when it starts and keeps what it grew to.
    open_clip_step.check_installed()
    print(f'[benchmark] {label}: timing the open_clip peer', flush=True)
    peer = open_clip_step.run(config, batch_np, warmup=_WARMUP.value, steps=_STEPS.value,
                              compile=_PEER_COMPILE.value)

  device = environment.device_description()
  platform = device['platform']
  warmup, steps = timing.default_counts(platform)
  warmup = warmup if _WARMUP.value is None else _WARMUP.value
  steps = steps if _STEPS.value is None else _STEPS.value
  print(f'[benchmark] {label} on {environment.describe(device)}: compiling mmfusion, then '
        f'{warmup} warm-up + {steps} timed steps', flush=True)
  mmfusion = mmfusion_step.run(config, batch_np, warmup=warmup, steps=steps)

  size = _MATMUL_SIZE.value or flops.matmul_size(platform)
  matmul = {'dtype': config.model.dtype, 'size': size, 'per_device_flops_per_sec':
            flops.measured_matmul_peak(config.model.dtype, platform, size=size)}
  arithmetic = flops.matmul_arithmetic(config.model.dtype, platform)
  datasheet = flops.datasheet_peak(jax.devices()[0].device_kind, arithmetic)

  rec = build_record(config=config, label=label, date=date, commit=commit, device=device,
                     device_summary=environment.describe(device), mmfusion=mmfusion,
                     matmul=matmul, datasheet_per_device=datasheet, arithmetic=arithmetic,
                     peer=peer)
  json_path = record_lib.write_json(rec, _JSON_OUT.value or record_lib.default_json_path(rec))
  print(summary(rec))
  print(f'[benchmark] record: {json_path}')
  if not _NO_RECORD.value:
    record_lib.append_train_step(rec, _RESULTS_MD.value)
    print(f'[benchmark] row appended to {_RESULTS_MD.value}')


if __name__ == '__main__':
  cli.run(main, program='benchmarks.train_step')
