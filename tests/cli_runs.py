"""Running the real CLI (`python -m mmfusion.main`) in a subprocess, as a user would, on a small
rendered dataset: shared by the end-to-end test modules."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small variant of the embedded dataset (renders in about a second) and a short schedule.
RUN = [
    '--config.data.builder_config=tiny,num_train=2048,num_validation=128,num_test=256',
    '--config.batch_size=64', '--config.log_every=10', '--config.checkpoint.every=10',
    '--config.optim.warmup_steps=10', '--config.optim.lr=2e-3',
]
SMALL = RUN + [
    '--config.evals.zeroshot.every=0', '--config.evals.retrieval.every=0',
    '--config.evals.zeroshot.batch_size=128', '--config.evals.retrieval.batch_size=128',
]

# The fused configs' short runs (ALBEF, CoCa): 10 steps, evaluated at the end.
FUSED = [*RUN, '--config.total_steps=10', '--config.evals.zeroshot.batch_size=128',
         '--config.evals.retrieval.batch_size=128']


# The test session's own directory (made by conftest.py before any worker starts).
SESSION_DIR = 'MMFUSION_TEST_SESSION_DIR'


def cli(config, workdir, data_dir, *flags, wait=True):
  env = dict(os.environ, MMFUSION_DATA_DIR=str(data_dir), TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONUNBUFFERED='1')
  cmd = [sys.executable, '-m', 'mmfusion.main', f'--config={ROOT}/configs/{config}',
         f'--workdir={workdir}', *flags]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]
