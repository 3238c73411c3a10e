"""The small runs that several test modules read, trained once per test session through the
real CLI: the first pytest-xdist worker to ask trains a run while a lock makes the other wait,
and every later request gets the finished workdir. Tests read these workdirs and never write
into them (copy one first).

Runs on the same dataset share a lock (GROUPS), so two processes never render one dataset at
once; runs of different groups train side by side. A test that needs several runs asks for them
together (`workdirs`) and trains those no other worker is training before it waits for the rest,
so neither worker idles while the other trains. Tests that read the data directory may render
other datasets there, never one that a shared run renders.

conftest.py makes the session's directory (`cli_runs.SESSION_DIR` in the environment) before
the workers start.
"""
import contextlib
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
# The lock each run trains under: one per dataset (builder config) the runs render.
GROUPS = {'clip': 'shapes_tiny', 'albef': 'shapes_tiny', 'trimodal': 'spoken_tiny',
          'spoken_vqa': 'spoken_tiny'}


def session_dir() -> str:
  return os.environ[SESSION_DIR]


def data_dir() -> str:
  return os.path.join(session_dir(), 'data')


def _path(name: str) -> str:
  return os.path.join(session_dir(), 'runs', name)


def _finished(name: str) -> bool:
  return os.path.exists(os.path.join(_path(name), 'final_metrics.json'))


@contextlib.contextmanager
def _group_lock(name: str, block: bool):
  """Holds the lock of `name`'s group (yields True), or yields False when another process holds
  it and `block` is off."""
  with open(os.path.join(session_dir(), f'lock_{GROUPS[name]}'), 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    yield True                              # released when the file closes


def _train(name: str) -> None:
  """Trains `name` (and the runs its config names in braces, first); the group lock is held."""
  if _finished(name):
    return
  config, flags = RUNS[name]
  needs = [other for other in RUNS if f'{{{other}}}' in config]
  assert all(GROUPS[other] == GROUPS[name] for other in needs), (name, needs)
  for other in needs:
    _train(other)
  config = config.format(**{other: _path(other) for other in needs})
  shutil.rmtree(_path(name), ignore_errors=True)           # a run that failed before
  run = cli(config, _path(name), data_dir(), *flags)
  assert run.returncode == 0, f'shared run {name!r} failed:\n' + (
      run.stdout[-3000:] + run.stderr[-3000:])


def workdirs(*names: str) -> dict[str, str]:
  """name -> the finished workdir of each shared run; trains first whichever no worker has yet,
  those whose group is free before waiting for a busy one."""
  pending = list(names)
  while pending:
    for name in pending:
      with _group_lock(name, block=False) as held:
        if held:
          _train(name)
          pending.remove(name)
          break
    else:
      with _group_lock(pending[0], block=True):
        _train(pending.pop(0))
  return {name: _path(name) for name in names}


def workdir(name: str) -> str:
  """The finished workdir of the shared run `name`, trained first if no worker has yet."""
  return workdirs(name)[name]
