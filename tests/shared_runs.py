"""The small runs that several test modules read, trained once per test session through the
real CLI: the first pytest-xdist worker to ask trains a run while a lock makes the other wait,
and every later request gets the finished workdir. Tests read these workdirs and never write
into them (copy one first). Their datasets render into one data directory under the lock;
tests that read it may render other datasets there, never one that a shared run renders, so
two processes never render the same dataset at once.

conftest.py makes the session's directory (`cli_runs.SESSION_DIR` in the environment) before
the workers start.
"""
import fcntl
import os
import shutil

from cli_runs import FUSED, SESSION_DIR, SMALL, cli

# name -> (config argument, CLI flags)
RUNS = {
    # CLIP, long enough that its loss falls and its retrieval beats chance.
    'clip': ('shapes_clip.py', (*SMALL, '--config.total_steps=120')),
    # ALBEF (contrastive towers + cross-attention fusion, ITM, MLM), 10 steps.
    'albef': ('shapes_albef.py', tuple(FUSED)),
    # Image, text and speech contrastive on the tiny spoken dataset, 30 steps.
    'trimodal': ('shapes_trimodal.py:smoke', ('--config.total_steps=30',)),
    # Spoken VQA fine-tuned from the tri-modal run, with modality dropout, 20 steps.
    'spoken_vqa': ('shapes_spoken_vqa.py:smoke,init={trimodal},modality_dropout=0.3',
                   ('--config.total_steps=20',)),
}


def session_dir() -> str:
  return os.environ[SESSION_DIR]


def data_dir() -> str:
  return os.path.join(session_dir(), 'data')


def workdir(name: str) -> str:
  """The finished workdir of the shared run `name`, trained first if no worker has yet."""
  config, flags = RUNS[name]
  # A run that starts from another names it in braces: that one is trained first.
  config = config.format(**{other: workdir(other) for other in RUNS if f'{{{other}}}' in config})
  path = os.path.join(session_dir(), 'runs', name)
  with open(os.path.join(session_dir(), 'lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)        # released when the file closes
    if not os.path.exists(os.path.join(path, 'final_metrics.json')):
      shutil.rmtree(path, ignore_errors=True)           # a run that failed before
      run = cli(config, path, data_dir(), *flags)
      assert run.returncode == 0, f'shared run {name!r} failed:\n' + (
          run.stdout[-3000:] + run.stderr[-3000:])
  return path
