r"""Training-step benchmark: mmfusion's step, its model FLOPs and MFU, against open_clip's step on the
same architecture, batch and precision, alternated in paired rounds. Appends a row to
benchmarks/RESULTS.md.

  python -m benchmarks.train_step --config configs/benchmark.py:tiny                 # CPU
  python -m benchmarks.train_step --config configs/benchmark.py:b16 --steps 30       # GPU
  python -m benchmarks.train_step --config configs/benchmark.py:tiny,scan --config.model.remat=full

Flags: --steps / --warmup per block (defaults: 8 / 2 on CPU, 30 / 5 on accelerators), --pairs N
(rounds of open_clip then mmfusion, default 5), --batch N (overrides config.batch_size),
--peer open_clip|none, --peer_python PATH (the interpreter the peer runs under: one whose
environment has torch and open_clip_torch; default this one), --peer_compile (torch.compile
the peer; off by default: eager is how open_clip trains unless asked), --no_record (skip
RESULTS.md), --json_out PATH (default benchmarks/results/<date>_<config>.json), --matmul_size N.

The batch is synthetic and lives on the device: the figures are for the step alone, no input
pipeline. The peer's process starts first and builds its step (benchmarks/peers/), then
mmfusion's step is compiled here; then the two are timed in turn, open_clip's block then
mmfusion's, `--pairs` times, each block warming its own side up first. Each figure is the
median over blocks of each block's median step; the ratio is the median of the per-round
ratios, reported with their min and max, so drift of a shared machine cancels instead of
deciding the result. Then a square matmul for the measured peak.
"""
from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import record as record_lib  # noqa: E402
from benchmarks import timing  # noqa: E402
from mmfusion import cli  # noqa: E402
from mmfusion import host_memory  # noqa: E402

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
_PAIRS = flags.DEFINE_integer('pairs', 5, 'Rounds of the peer then mmfusion (one block each); '
                              'with --peer none, one block of mmfusion.', lower_bound=1)
_PEER_PYTHON = flags.DEFINE_string('peer_python', '', 'Interpreter the peer runs under (its '
                                   'environment needs torch and open_clip_torch); default: this one.')
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


def block_figures(blocks: list[list[float]]) -> dict:
  """A side's timed blocks -> its step seconds (all, in order), each block's median, and the
  reported step time: the median of the block medians."""
  medians = [timing.median(b) for b in blocks]
  return {'step_seconds': [t for b in blocks for t in b], 'block_median_s': medians,
          'median_step_s': timing.median(medians)}


def build_record(*, config, label, date, commit, device, device_summary, mmfusion, matmul,
                 datasheet_per_device, arithmetic, peer) -> dict:
  """One run as a flat JSON-able dict; every derived figure is computed here, once.

  `mmfusion` and `peer` (None: no peer) hold their block_figures; a peer's blocks are paired
  with mmfusion's, round by round."""
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
    peer['flops_note'] = ("mmfusion's model FLOPs per step: the same model and loss (up to the "
                          'small differences the peer lists), so the same model FLOPs; open_clip '
                          "also computes every token in the towers' last blocks, which its loss "
                          'never reads (model FLOPs: mmfusion_step.flops_reference)')
    out['peer'] = peer
    # examples/s ratio of each round = the peer's median step / mmfusion's.
    ratios = [p / m for p, m in zip(peer['block_median_s'], mmfusion['block_median_s'])]
    out['pair_ratios'] = ratios
    out['ratio_vs_peer'] = timing.median(ratios)
    out['ratio_min'], out['ratio_max'] = min(ratios), max(ratios)
  return out


def _blocks(side: dict) -> str:
  blocks = side['block_median_s']
  if len(blocks) == 1:
    return f"median of {len(side['step_seconds'])} steps"
  return (f"median of {len(blocks)} blocks' medians, "
          f"{1e3 * min(blocks):.1f}-{1e3 * max(blocks):.1f}")


def summary(rec: dict) -> str:
  mm = rec['mfu_vs_matmul']
  ds = rec['mfu_vs_datasheet']
  lines = [
      f"[benchmark] {rec['config_label']}  batch {rec['batch_size']}  {rec['compute_dtype']}",
      f"  on {rec['device_summary']}, commit {rec['commit']}, {rec['date']}",
      f"  mmfusion : {1e3 * rec['median_step_s']:.1f} ms/step ({_blocks(rec)}),"
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
        f"  open_clip: {1e3 * peer['median_step_s']:.1f} ms/step ({_blocks(peer)}), "
        f"{peer['examples_per_sec']:.1f} "
        f"examples/s, {peer['achieved_flops_per_sec'] / 1e12:.4g} TFLOP/s at mmfusion's FLOPs/step "
        f"({'torch.compile' if peer['compiled'] else 'eager'}, {peer['precision']}, {peer['device']})")
    lines.append(
        f"  mmfusion/open_clip = {rec['ratio_vs_peer']:.2f}x (examples/s; median of "
        f"{len(rec['pair_ratios'])} paired rounds, min {rec['ratio_min']:.2f}, max "
        f"{rec['ratio_max']:.2f}: {', '.join(f'{r:.2f}' for r in rec['pair_ratios'])})")
  return '\n'.join(lines)


def main():
  if _PEER.value != 'none':
    # The peer's process holds its GPU memory while mmfusion runs and the other way round:
    # JAX then takes memory as it needs it, instead of most of the device at start.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  # Heavy imports after flag parsing, so --help and flag errors are instant.
  import jax
  from benchmarks import environment, flops, mmfusion_step, synthetic

  config = _CONFIG.value
  if _BATCH.value:
    config.batch_size = _BATCH.value
  date, commit, label = environment.utc_now(), environment.git_commit(), config_label()
  batch_np = synthetic.synthetic_batch(config, config.batch_size, seed=config.seed)

  with contextlib.ExitStack() as cleanup:
    peer = None
    if _PEER.value == 'open_clip':
      from benchmarks.peers import open_clip_step
      print(f'[benchmark] {label}: building the open_clip peer', flush=True)
      peer = open_clip_step.start(config, batch_np, python=_PEER_PYTHON.value or sys.executable,
                                  compile=_PEER_COMPILE.value)
      cleanup.callback(peer.kill)

    device = environment.device_description()
    platform = device['platform']
    warmup, steps = timing.default_counts(platform)
    warmup = warmup if _WARMUP.value is None else _WARMUP.value
    steps = steps if _STEPS.value is None else _STEPS.value
    # What the start chose (`__main__` below); the peer runs with the caller's environment.
    host_line = host_memory.outcome() or 'host memory: as started (main() called in-process)'
    print(f'[benchmark] {label} on {environment.describe(device)}: compiling mmfusion; '
          f'{host_line}', flush=True)
    step = mmfusion_step.CompiledStep(config, batch_np)

    sides = [('mmfusion', lambda: step.time(warmup=warmup, steps=steps))]
    pairs = 1
    if peer is not None:
      sides.insert(0, ('open_clip', lambda: peer.time(warmup=warmup, steps=steps)))
      pairs = _PAIRS.value
    print(f'[benchmark] timing {pairs} round(s) of ' + ' then '.join(n for n, _ in sides) +
          f', each block {warmup} warm-up + {steps} timed steps', flush=True)
    blocks = timing.alternate(sides, pairs=pairs)
    mmfusion = {**block_figures(blocks['mmfusion']), **step.info, 'memory': step.memory(),
                'host_memory': host_line}
    peer_figures = None
    if peer is not None:
      peer_figures = {**peer.ready, **block_figures(blocks['open_clip']), 'warmup': warmup,
                      **peer.close()}

  size = _MATMUL_SIZE.value or flops.matmul_size(platform)
  matmul = {'dtype': config.model.dtype, 'size': size, 'per_device_flops_per_sec':
            flops.measured_matmul_peak(config.model.dtype, platform, size=size)}
  arithmetic = flops.matmul_arithmetic(config.model.dtype, platform)
  datasheet = flops.datasheet_peak(jax.devices()[0].device_kind, arithmetic)

  rec = build_record(config=config, label=label, date=date, commit=commit, device=device,
                     device_summary=environment.describe(device), mmfusion=mmfusion,
                     matmul=matmul, datasheet_per_device=datasheet, arithmetic=arithmetic,
                     peer=peer_figures)
  json_path = record_lib.write_json(rec, _JSON_OUT.value or record_lib.default_json_path(rec))
  print(summary(rec))
  print(f'[benchmark] record: {json_path}')
  if not _NO_RECORD.value:
    record_lib.append_train_step(rec, _RESULTS_MD.value)
    print(f'[benchmark] row appended to {_RESULTS_MD.value}')


if __name__ == '__main__':
  # May restart the process (same pid and arguments) with huge pages: before anything else.
  host_memory.ensure_huge_pages_or_exit('benchmarks.train_step')
  cli.run(main, program='benchmarks.train_step')
