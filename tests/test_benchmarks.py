"""The benchmark harness's accounting against hand computations, its CLI end to end on a tiny
shape, and the RESULTS.md table. Nothing here is timed: benchmarks never assert speed."""
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops
from benchmarks import mmfusion_step
from benchmarks import record
from benchmarks import timing
from configs import benchmark
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_read_flops_of_a_matmul_is_2mnk():
  m, n, k = 96, 40, 72
  lowered = jax.jit(jnp.matmul).lower(jax.ShapeDtypeStruct((m, k), jnp.float32),
                                      jax.ShapeDtypeStruct((k, n), jnp.float32))
  assert flops.read_flops(lowered) == 2 * m * n * k
  assert flops.read_flops(lowered.compile()) == 2 * m * n * k


def _analytic_train_flops(config):
  """Matmul FLOPs of one CLIP training step by hand: forward x 3 (the backward pass is two
  matmuls per forward one). Per token and layer: q, k, v, out projections (4 W^2 MACs), the
  MLP (2 W M), and attention scores + weighted sum (2 N W MACs; XLA computes the full N x N
  under a causal mask too); plus the patch embedding, both projections and the B x B logits.
  In the last layer CLIP's loss reads only the pooled token: every token's keys and values
  (2 W^2), and the rest for that one token (encoder.Encoder)."""
  batch, embed = config.batch_size, config.model.embed_dim
  size, patch = config.data.image_size, config.model.towers.image.patch_size
  patches = (size // patch) ** 2

  def encoder(tokens, tower):
    w, m = tower.width, tower.mlp_dim
    layer = tokens * (2 * (4 * w * w + 2 * w * m) + 2 * 2 * tokens * w)
    last = tokens * 2 * 2 * w * w + 2 * (2 * w * w + 2 * w * m) + 2 * 2 * tokens * w
    return (tower.depth - 1) * layer + last

  image_w, text_w = config.model.towers.image.width, config.model.towers.text.width
  image = (encoder(patches + 1, config.model.towers.image)          # + cls token
           + patches * 2 * (patch * patch * 3) * image_w + 2 * image_w * embed)
  text = encoder(config.tokenizer.max_len, config.model.towers.text) + 2 * text_w * embed
  return 3 * (batch * (image + text) + 2 * batch * batch * embed)

@pytest.mark.parametrize('arg', ['tiny,depth=2,batch=16', 'tiny,depth=2,batch=16,scan,remat=full'])
def test_model_flops_match_a_hand_count(arg):
  config = benchmark.get_config(arg)
  config.data.image_size = 32
  config.tokenizer.max_len = 16
  step_flops, source = mmfusion_step.model_flops(config)
  # The rest (layer norms, softmax, GELU, AdamW) is a few per cent at this size.
  assert step_flops == pytest.approx(_analytic_train_flops(config), rel=0.05)
  if 'scan' in arg:   # XLA counts a scanned body once: the figure must come from the unrolled step
    assert 'scan_layers=False' in source and 'remat=none' in source


def test_config_with_changes_a_locked_copy_and_names_a_key_it_lacks():
  config = benchmark.get_config('tiny')
  config.lock()
  changed = mmfusion_step.config_with(config, {'model.remat': 'full', 'batch_size': 8})
  assert (changed.model.remat, changed.batch_size) == ('full', 8)
  assert (config.model.remat, config.batch_size) == ('none', benchmark.get_config('tiny').batch_size)
  with pytest.raises(AttributeError):   # locked, as the config it came from
    changed.model.no_such_field = 1
  for key in ('model.no_such_field', 'no_such_group.remat', 'batch_size.x'):
    with pytest.raises(KeyError, match=repr(key)):
      mmfusion_step.config_with(config, {key: 1})


def test_time_steps_syncs_every_call_and_times_only_the_timed_ones():
  calls, synced = [], []
  seconds = timing.time_steps(lambda: calls.append(1) or len(calls), warmup=2, steps=3,
                              sync=synced.append)
  assert len(seconds) == 3 and len(calls) == 5 and synced == [1, 2, 3, 4, 5]
  assert all(s >= 0 for s in seconds)
  with pytest.raises(ValueError, match='steps >= 1'):
    timing.time_steps(lambda: None, warmup=0, steps=0, sync=lambda _: None)


def test_alternate_runs_the_sides_in_rounds_each_block_its_own():
  order = []
  blocks = timing.alternate([('a', lambda: order.append('a') or [1.0, 3.0]),
                             ('b', lambda: order.append('b') or [2.0])], pairs=3, pause_s=0)
  assert order == ['a', 'b'] * 3
  assert blocks == {'a': [[1.0, 3.0]] * 3, 'b': [[2.0]] * 3}
  with pytest.raises(ValueError, match='pairs >= 1'):
    timing.alternate([('a', lambda: [1.0])], pairs=0)


def _start_fake_peer(tmp_path, mode, monkeypatch):
  from benchmarks.peers import protocol
  (tmp_path / 'mode').write_text(mode)
  monkeypatch.setenv('PYTHONPATH', ROOT)
  return protocol.PeerProcess('fake', 'fake_peer_worker', str(tmp_path), python=sys.executable,
                              cwd=os.path.join(ROOT, 'tests'))


def test_a_peer_process_times_blocks_on_request_and_reports_at_close(tmp_path, monkeypatch,
                                                                     capfd):
  with _start_fake_peer(tmp_path, 'ok', monkeypatch) as peer:
    assert peer.ready['name'] == 'fake' and 'event' not in peer.ready
    first, second = peer.time(warmup=2, steps=3), peer.time(warmup=0, steps=1)
    assert len(first) == 3 and len(second) == 1 and all(t >= 0.002 for t in first + second)
    assert peer.close()['calls'] == 6          # warm-up calls run, and are not timed
  assert "a line of the worker's own output" in capfd.readouterr().out   # passed through


@pytest.mark.parametrize('mode,when', [('crash', 'start'), ('die', 'time')])
def test_a_peer_that_exits_fails_in_one_error_naming_it(tmp_path, monkeypatch, mode, when):
  from benchmarks.peers import protocol
  with pytest.raises(protocol.PeerFailed, match=r'the fake peer ended without a reply '
                     r'\(exit status [13]\).*--peer none'):
    with _start_fake_peer(tmp_path, mode, monkeypatch) as peer:
      assert when == 'time'
      peer.time(warmup=0, steps=1)


def test_paired_record_reports_the_median_of_per_round_ratios(monkeypatch):
  from benchmarks import train_step
  monkeypatch.setattr(train_step, 'config_flags', _FakeConfigFlags)
  config = benchmark.get_config('tiny')
  mmfusion = {**train_step.block_figures([[2.0, 2.2, 1.0], [4.0], [1.0, 1.0]]),
              'flops_per_step': 1e12, 'memory': {}}
  peer = train_step.block_figures([[3.0], [4.4], [1.5]])
  assert mmfusion['block_median_s'] == [2.0, 4.0, 1.0] and mmfusion['median_step_s'] == 2.0
  rec = train_step.build_record(
      config=config, label='x', date='d', commit='c', device={'device_count': 1},
      device_summary='cpu', mmfusion=mmfusion, matmul={'per_device_flops_per_sec': 1e12},
      datasheet_per_device=None, arithmetic='float32', peer=peer)
  # Per round: 3.0/2.0, 4.4/4.0, 1.5/1.0 -> 1.5, 1.1, 1.5; the ratio of the overall medians
  # (3.0 / 2.0) would hide that one round in three came out at 1.1.
  assert rec['pair_ratios'] == pytest.approx([1.5, 1.1, 1.5])
  assert rec['ratio_vs_peer'] == pytest.approx(1.5)
  assert (rec['ratio_min'], rec['ratio_max']) == pytest.approx((1.1, 1.5))
  assert rec['peer']['examples_per_sec'] == pytest.approx(config.batch_size / 3.0)
  assert record._ratio_cell(rec) == '1.50 (3 rounds, 1.10-1.50)'


class _FakeConfigFlags:
  """build_record reads the --config flag's file name and overrides; a test has no flag."""
  get_config_filename = staticmethod(lambda flag: 'configs/benchmark.py')
  get_override_values = staticmethod(lambda flag: {})


def test_datasheet_peaks_by_device_kind():
  assert flops.datasheet_peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4e12
  assert flops.datasheet_peak('NVIDIA H100 80GB HBM3', 'tfloat32') == 494.7e12
  assert flops.datasheet_peak('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert flops.datasheet_peak('NVIDIA H200', 'bfloat16') == 989.4e12
  assert flops.datasheet_peak('NVIDIA A100-SXM4-80GB', 'float32') == 19.5e12
  assert flops.datasheet_peak('TPU v5 lite', 'bfloat16') == 197e12
  assert flops.datasheet_peak('TPU v5', 'bfloat16') == 459e12
  assert flops.datasheet_peak('TPU v6 lite', 'bfloat16') == 918e12
  assert flops.datasheet_peak('cpu', 'float32') is None
  assert flops.matmul_arithmetic('float32', 'gpu') == 'tfloat32'
  assert flops.matmul_arithmetic('bfloat16', 'gpu') == 'bfloat16'


# `python -m MODULE ARGS` with TensorFlow and TFDS unimportable, as on the device image.
WITHOUT_TENSORFLOW = """
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def test_cli_end_to_end_without_tensorflow_writes_a_consistent_record(tmp_path):
  json_out, results_md = tmp_path / 'run.json', tmp_path / 'RESULTS.md'
  cmd = [sys.executable, '-c', WITHOUT_TENSORFLOW, 'benchmarks.train_step',
         '--config', 'configs/benchmark.py:tiny,depth=1,batch=8',
         '--config.data.image_size=16', '--config.tokenizer.max_len=8',
         '--steps', '2', '--warmup', '1', '--peer', 'none', '--matmul_size', '128',
         '--no_record', f'--results_md={results_md}', f'--json_out={json_out}']
  # The session's unoptimised XLA (conftest.py): this test checks accounting, not speed.
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2')
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'mmfusion :' in run.stdout and 'examples/s' in run.stdout
  assert not results_md.exists()      # --no_record

  rec = json.loads(json_out.read_text())
  assert rec['batch_size'] == 8 and len(rec['step_seconds']) == 2
  assert rec['overrides'] == {'data.image_size': 16, 'tokenizer.max_len': 8}
  assert rec['median_step_s'] == pytest.approx(timing.median(rec['step_seconds']))
  assert rec['examples_per_sec'] == pytest.approx(8 / rec['median_step_s'])
  assert rec['achieved_flops_per_sec'] == pytest.approx(rec['flops_per_step'] / rec['median_step_s'])
  assert rec['mfu_vs_matmul'] == pytest.approx(
      rec['achieved_flops_per_sec'] / rec['matmul_peak_flops_per_sec'])
  assert rec['matmul'] == {'dtype': 'float32', 'size': 128,
                           'per_device_flops_per_sec': rec['matmul_peak_flops_per_sec']}
  assert rec['mfu_vs_datasheet'] is None and rec['datasheet_peak_flops_per_sec'] is None  # CPU
  assert rec['device']['platform'] == 'cpu' and rec['peer'] is None
  memory = rec['memory']['xla']
  assert memory['total'] == memory['argument'] + memory['output'] + memory['temp'] - memory['alias']
  assert rec['memory']['host_max_rss_bytes'] > 0
  assert len(record.table_row(rec)) == len(record.TRAIN_STEP_COLUMNS)


def _record(ratio):
  return {'date': '2026-01-02T03:04:05+00:00', 'device_summary': 'cpu x1, 2 CPU cores',
          'commit': 'abc1234', 'config_label': 'configs/benchmark.py:tiny', 'batch_size': 128,
          'median_step_s': 2.0, 'examples_per_sec': 64.0, 'lower_s': 1.0, 'compile_s': 2.5,
          'flops_per_step': 3.69e11, 'flops_source': 'XLA cost analysis of this config',
          'achieved_flops_per_sec': 1.845e11, 'mfu_vs_matmul': 0.5, 'mfu_vs_datasheet': None,
          'memory': {'device_peak_bytes': None, 'host_max_rss_bytes': 2**31,
                     'xla': {'total': 2**30}},
          'peer': {'examples_per_sec': 32.0}, 'ratio_vs_peer': ratio}


def test_train_step_rows_go_under_one_header(tmp_path):
  path = tmp_path / 'RESULTS.md'
  record.append_train_step(_record(2.0), str(path))
  record.append_train_step(_record(3.0), str(path))
  lines = path.read_text().splitlines()
  header = [i for i, l in enumerate(lines) if l.startswith('| Date (UTC)')]
  assert len(header) == 1 and lines.count('## Train step') == 1
  rows = lines[header[0] + 2:]
  assert len(rows) == 2 and rows[1].endswith('| 3.00 |')
  assert rows[0] == (
      '| 2026-01-02 03:04 | cpu x1, 2 CPU cores | abc1234 | `configs/benchmark.py:tiny` | 128 | '
      '2000.0 | 64.0 | 3.5 | 0.369 (as run) | 0.1845 | 50.0% | n/a | 2.00 GiB host RSS; '
      'XLA 1.00 GiB | 32.0 | 2.00 |')


def test_a_new_results_file_starts_with_a_preamble_naming_every_section(tmp_path):
  path = tmp_path / 'RESULTS.md'
  record.append_row(str(path), 'Compile time', ('A',), ['x'])
  text = path.read_text()
  assert text.startswith('# Benchmark results\n\n')
  assert text.endswith('\n\n## Compile time\n\n| A |\n| --- |\n| x |\n')
  assert text.count('\n## ') == 1          # the preamble itself opens no section
  sections = {record.TRAIN_STEP_SECTION: 'train_step', record.COMPILE_TIME_SECTION: 'compile_time',
              record.PIPELINE_SECTION: 'pipeline'}
  assert set(sections) == {'Train step', 'Compile time', 'Input pipeline'}
  for section, module in sections.items():
    assert f'\n- {section}: `python -m benchmarks.{module} --config CONFIG' in text


OTHER = """# Benchmark results

## Train step

Some words about the train step.

| Date | Examples/s |
| --- | --- |
| 2026-01-01 | 123 |

## Notes

Free text that must survive.
"""


def test_results_row_goes_under_its_own_section(tmp_path):
  path = str(tmp_path / 'RESULTS.md')
  with open(path, 'w') as f:
    f.write(OTHER)
  columns = ('Date', 'Batch')
  record.append_row(path, 'Input pipeline', columns, ['d1', 32], intro='Intro,\ntwo lines.')
  record.append_row(path, 'Input pipeline', columns, ['d2', 64])
  text = open(path).read()
  assert text.startswith(OTHER.rstrip('\n'))   # the other sections, byte for byte
  assert text[len(OTHER.rstrip('\n')):] == (
      '\n\n## Input pipeline\n\nIntro,\ntwo lines.\n\n| Date | Batch |\n| --- | --- |\n'
      '| d1 | 32 |\n| d2 | 64 |\n')
  # A row for an existing section in the middle of the file lands at the end of its table.
  record.append_row(path, 'Train step', ('Date', 'Examples/s'), ['d3', 456])
  lines = open(path).read().splitlines()
  assert lines[lines.index('| 2026-01-01 | 123 |') + 1] == '| d3 | 456 |'
  assert lines[lines.index('| d3 | 456 |') + 1:][:3] == ['', '## Notes', '']
  with pytest.raises(ValueError, match='has the header'):
    record.append_row(path, 'Train step', ('Date', 'Other'), ['d4', 1])
  assert os.listdir(tmp_path) == ['RESULTS.md']   # no temporary file left behind


def test_open_clip_peer_imports_torch_lazily(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)       # as if not installed
  monkeypatch.setitem(sys.modules, 'open_clip', None)
  monkeypatch.delitem(sys.modules, 'benchmarks.peers.open_clip_step', raising=False)
  peer = importlib.import_module('benchmarks.peers.open_clip_step')
  with pytest.raises(ImportError, match=r"pip install -e '\.\[bench\]'"):
    peer.check_installed()
  with pytest.raises(ImportError, match='--peer_python /no/such/python: cannot run it'):
    peer.check_installed('/no/such/python')


def test_open_clip_worker_imports_neither_jax_nor_tensorflow():
  # torch's triton and jaxlib both register LLVM options; one process with both aborts.
  code = ('import sys, benchmarks.peers.open_clip_worker; '
          "print(sorted({'jax', 'jaxlib', 'tensorflow', 'mmfusion'} & set(sys.modules)))")
  run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == '[]'


def test_open_clip_spec_has_the_config_architecture():
  from benchmarks.peers import open_clip_step
  config = benchmark.get_config('b16')
  spec = open_clip_step.spec(config)
  assert spec['vision_cfg'] == dict(image_size=224, patch_size=16, width=768, layers=12,
                                    head_width=64, mlp_ratio=4.0, pool_type='tok')
  assert spec['text_cfg'] == dict(context_length=77, vocab_size=49408, width=512, heads=8,
                                  layers=12, mlp_ratio=4.0, no_causal_mask=False, pad_id=0,
                                  eos_id=3, pool_type='eos')
  assert spec['embed_dim'] == 512 and spec['precision'] == 'amp_bf16'
  config.model.towers.image.pool = 'map'
  with pytest.raises(ValueError, match='config.model.towers.image.pool'):
    open_clip_step.spec(config)


def test_contrastive_memory_benchmark_records_linear_ring_and_quadratic_dense(tmp_path):
  json_out, results_md = tmp_path / 'run.json', tmp_path / 'RESULTS.md'
  cmd = [sys.executable, '-m', 'benchmarks.contrastive_memory', '--batches=256,512,1024',
         '--dim=16', '--chunk_size=8', f'--results_md={results_md}', f'--json_out={json_out}']
  # The benchmark asks for its 8 host devices itself.
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=xla_flags())
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]

  rec = json.loads(json_out.read_text())
  assert rec['devices'] == 8 and rec['machine'].startswith('cpu x8')
  rows = {(r['loss'], r['batch']): r for r in rec['results']}
  assert set(rows) == {(loss, b) for loss in ('ring', 'dense', 'softmax')
                       for b in (256, 512, 1024)}
  for (loss, batch), r in rows.items():
    memory = r['memory']
    assert memory['total'] == (memory['argument'] + memory['output'] + memory['temp']
                               - memory['alias'])
    if batch > 256:
      previous = rows[loss, batch // 2]['memory']
      assert r['total_growth'] == pytest.approx(memory['total'] / previous['total'])
  # XLA's plan is deterministic: the acceptance property itself, 2x vs 4x per doubling.
  assert rows['ring', 1024]['temp_growth'] < 2.5, rows['ring', 1024]
  assert rows['dense', 1024]['temp_growth'] > 3.0 and rows['softmax', 1024]['temp_growth'] > 3.0
  assert rows['ring', 1024]['chunk'] == 8 and rows['dense', 1024]['chunk'] is None

  text = results_md.read_text()
  assert text.startswith('# Benchmark results\n')
  section = record.CONTRASTIVE_MEMORY_SECTION
  assert f'\n- {section}: `python -m benchmarks.contrastive_memory`' in text
  lines = text[text.index(f'## {section}'):].splitlines()
  table = [l for l in lines if l.startswith('| ')]
  assert table[0].startswith('| Date (UTC) | Machine | Commit | Loss | Global batch |')
  assert len(table) == 2 + 9 and table[2].split(' | ')[3:5] == ['ring', '256']


def test_accumulation_memory_benchmark_records_smaller_temporaries_per_micro_batch(tmp_path):
  json_out, results_md = tmp_path / 'run.json', tmp_path / 'RESULTS.md'
  cmd = [sys.executable, '-m', 'benchmarks.accumulation_memory',
         '--config=configs/benchmark.py:tiny,depth=3', '--batch=16', '--accum=1,4',
         f'--results_md={results_md}', f'--json_out={json_out}']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]
  rec = json.loads(json_out.read_text())
  one, four = rec['results']
  assert (one['accum_steps'], four['accum_steps'], four['micro_batch']) == (1, 4, 4)
  # The towers' activations of a quarter of the batch: XLA's plan is deterministic.
  assert four['memory']['temp'] < 0.6 * one['memory']['temp'], rec
  assert four['temp_vs_1'] == pytest.approx(four['memory']['temp'] / one['memory']['temp'])
  text = results_md.read_text()
  table = [l for l in text[text.index(f'## {record.ACCUMULATION_MEMORY_SECTION}'):].splitlines()
           if l.startswith('| ')]
  assert table[0].startswith('| Date (UTC) | Machine | Commit | Config | Global batch |')
  assert len(table) == 4 and table[3].split(' | ')[5:7] == ['4', '4']


def test_gpu_checks_without_tensorflow_compare_bf16_with_float32_and_name_the_attention(tmp_path):
  json_out = tmp_path / 'checks.json'
  cmd = [sys.executable, '-c', WITHOUT_TENSORFLOW, 'benchmarks.gpu_checks',
         '--config', 'configs/benchmark.py:tiny,depth=1,batch=8',
         '--config.data.image_size=16', '--config.tokenizer.max_len=8',
         '--checks', 'cudnn,bf16', '--steps', '3', '--check_batch', '8', f'--json_out={json_out}']
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2')
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  rec = json.loads(json_out.read_text())
  # On a CPU, 'auto' resolves to XLA's attention: no cuDNN call may appear. Instead the step
  # is lowered as cuDNN would get it, each call checked: the image's and the text's.
  operands = rec['cudnn'].pop('operand_checks')
  assert rec['cudnn'] == {'attention_impls': ['xla'], 'cudnn_custom_calls': [],
                          'cudnn_taken': False}
  assert len(operands['calls']) == 2 and operands['refused'] == 0
  bf16 = rec['bf16']
  assert len(bf16['losses']['float32']) == len(bf16['losses']['bfloat16']) == 3
  assert bf16['losses']['float32'] != bf16['losses']['bfloat16']      # really two precisions
  assert 0 < bf16['max_rel_diff'] <= bf16['rtol'] and bf16['within_rtol']


def test_cudnn_refusal_is_the_wrappers_own_and_prepared_operands_pass():
  """jax's cuDNN wrapper checks a call's operands only when it traces on a GPU. CLIP's text (77
  tokens, a key-padding mask) is refused as it comes, for the bias's length and, broadcast, for
  an odd length in training; as attention.cudnn_masked_operands prepares it, it passes."""
  from benchmarks import gpu_checks
  from mmfusion.models.attention import cudnn_masked_operands
  q = k = v = jnp.zeros((2, 77, 8, 64), jnp.bfloat16)
  key_padding = jnp.arange(77)[None, None, None, :] < jnp.array([30, 77])[:, None, None, None]
  assert 'Bias must have same seq length' in gpu_checks.cudnn_refusal(q, k, v, key_padding)
  assert 'Unsupported sequence length' in gpu_checks.cudnn_refusal(
      q, k, v, jnp.broadcast_to(key_padding, (2, 1, 77, 77)))
  assert gpu_checks.cudnn_refusal(*cudnn_masked_operands(q, k, v, key_padding)) is None
  assert gpu_checks.cudnn_refusal(q, k, v, None) is None          # no mask: any length
  f32 = jnp.zeros((2, 78, 8, 64), jnp.float32)
  assert 'fp16/bf16' in gpu_checks.cudnn_refusal(f32, f32, f32, None)


def test_the_b16_step_hands_cudnn_only_calls_it_accepts(monkeypatch):
  """Every attention call of the B/16 train step (one layer, batch 2), lowered as a GPU would
  in bfloat16 with attention 'cudnn', passes the wrapper's checks; with the operands handed over
  unprepared, the text tower's calls are refused (the step would not lower on a GPU)."""
  from benchmarks import gpu_checks
  from mmfusion.models import attention
  config = benchmark.get_config('b16,depth=1,batch=2')
  checked = gpu_checks.check_cudnn_operands(config)
  shapes = [(c['query'], c['mask']) for c in checked['calls']]
  assert shapes == [([2, 197, 12, 64], None), ([2, 78, 8, 64], [2, 1, 78, 78])]
  assert checked['refused'] == 0
  monkeypatch.setattr(attention, 'cudnn_masked_operands', lambda q, k, v, mask: (q, k, v, mask))
  unprepared = gpu_checks.check_cudnn_operands(config)
  assert unprepared['refused'] == 1
  assert 'Bias must have same seq length' in unprepared['calls'][1]['refusal']


def test_the_largest_batch_search_finds_the_last_batch_whose_plan_fits(monkeypatch):
  from benchmarks import accumulation_memory, gpu_checks
  gib = 2**30
  per_example = {'none': 0.010 * gib, 'save_dots': 0.006 * gib, 'full': 0.002 * gib}

  def plan(config, accum_steps, batch):   # params + optimizer state, then linear in the batch
    return {'total': int(2 * gib + per_example[config.model.remat] * batch)}, 0.0

  monkeypatch.setattr(accumulation_memory, 'plan', plan)
  found = gpu_checks.check_max_batch(benchmark.get_config('tiny,batch=64'), limit=80 * gib)
  for remat, row in found.items():
    exact = (80 - 2) * gib / per_example[remat]           # where the plan meets the memory
    assert row['max_batch'] % 8 == 0
    assert 0.95 * exact <= row['max_batch'] <= exact, (remat, row)
