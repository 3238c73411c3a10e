"""The input-pipeline and compile-time benchmarks run end to end (RESULTS.md itself is tested
in test_benchmarks.py).

The benchmarks run as a user runs them, in subprocesses, on the tiny dataset and a shrunk
model; their numbers are not judged here (benchmarks are never timed assertions).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *flags, **env):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **env)
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def test_pipeline_benchmark_writes_consistent_json(data_dir, tmp_path):
  out = tmp_path / 'pipeline.json'
  run = run_module('benchmarks.pipeline', f'--config={ROOT}/configs/shapes_clip.py:smoke',
                   '--batches=5', '--warmup=1', '--no_record', f'--json_out={out}',
                   '--step_examples_per_sec=100', MMFUSION_DATA_DIR=str(data_dir))
  assert run.returncode == 0, run.stdout + run.stderr
  result = json.loads(out.read_text())
  assert result['batch'] == 32 and result['batches'] == 5      # the smoke config's batch
  assert result['examples_per_sec'] == pytest.approx(32 * result['batches_per_sec'])
  assert result['batches_per_sec'] == pytest.approx(5 / result['seconds'])
  assert 0 < result['ms_per_batch_median'] <= result['ms_per_batch_p90']
  assert result['headroom'] == pytest.approx(result['examples_per_sec'] / 100)
  assert result['config'].endswith('configs/shapes_clip.py:smoke')
  assert {'date', 'machine', 'commit'} <= set(result)   # environment.py's fields
  assert 'headroom' in run.stdout


def test_compile_time_benchmark_times_each_depth_in_a_fresh_process(tmp_path):
  out = tmp_path / 'compile.json'
  shrink = ['--config.data.image_size=16', '--config.tokenizer.max_len=8',
            '--config.batch_size=8']
  # The session's unoptimised XLA (conftest.py) reaches the benchmark's compile subprocesses:
  # the harness, not the code, is under test here, so one mode (two fresh processes) will do;
  # the modes differ only in the config flag each process is given.
  run = run_module('benchmarks.compile_time', '--config=configs/benchmark.py:tiny',
                   '--depths=1,2', '--modes=scan', '--repeats=1', '--no_record',
                   f'--json_out={out}', *shrink)
  assert run.returncode == 0, run.stdout + run.stderr
  result = json.loads(out.read_text())
  assert sorted((r['mode'], r['depth']) for r in result['results']) == [('scan', 1), ('scan', 2)]
  for r in result['results']:
    assert r['lower_s'] > 0 and r['compile_s'] > 0, r
    assert r['total_s'] == pytest.approx(r['lower_s'] + r['compile_s'])
  # The overrides reached the measured processes, and the verdict is printed.
  assert all(flag in result['config'] for flag in shrink)
  assert 'target: with scan' in run.stdout
  assert set(result['ratios']) == {'scan'} and 'scan_total_ratio_meets_target' in result
  assert {'date', 'machine', 'commit'} <= set(result)


def test_compile_time_refuses_depth_in_the_config_argument():
  run = run_module('benchmarks.compile_time', '--config=configs/benchmark.py:tiny,depth=3',
                   '--depths=1,2', '--no_record')
  assert run.returncode != 0
  assert 'leave depth= and scan out of the config argument' in run.stderr
