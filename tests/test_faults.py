"""A trainer that never loses work, and one line for every error.

  * kill -9 at random moments (mid-save included) and SIGTERM: the resumed run ends bitwise
    where an uninterrupted one does;
  * non-finite losses: 'stop' names the step and keeps every checkpoint from before it, 'skip'
    drops exactly that update;
  * a failing evaluator costs no checkpoint; damaged checkpoints fall back to an older one;
  * a corpus of bad inputs (config, data, checkpoint, resume, workdir, mesh), each ending in one
    line naming its cause, with no traceback shown.
"""
import ast
import json
import os
import pathlib
import random
import shutil
import signal
import time

import numpy as np
import pytest

import shared_runs
from cli_runs import SMALL, cli
from mmfusion import checkpoint as ckpt
from mmfusion import errors
from mmfusion import lock as lock_lib

CLIP_RUN = ('shapes_clip.py', (*SMALL, '--config.total_steps=120'))   # the shared run 'clip'


def with_flags(config, flags):
  """`config` with '--config.a.b=value' overrides applied, as the command line would."""
  config.unlock()
  for flag in flags:
    key, value = flag[len('--config.'):].split('=', 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def clip_config(*flags):
  """The config of the shared 'clip' run (tests/shared_runs.py), with `flags` on top."""
  from configs import shapes_clip
  config = with_flags(shapes_clip.get_config(), [*CLIP_RUN[1], *flags])
  config.data.data_dir = shared_runs.data_dir()
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """This module's own data dir: its runs train tokenizers of their own sizes there."""
  return tmp_path_factory.mktemp('faults_data')


@pytest.fixture(scope='module')
def clip_run():
  return pathlib.Path(shared_runs.workdir('clip'))


def copy_run(run, tmp_path, name='copy'):
  target = tmp_path / name
  shutil.copytree(run, target, ignore=shutil.ignore_patterns('.lock'))
  return target


def damage(step_dir: pathlib.Path) -> None:
  """What a disk fault or a half-copied directory leaves: a step's array store is gone."""
  (step_dir / 'state' / 'manifest.ocdbt').unlink()


# -- kill -9 and SIGTERM ------------------------------------------------------------------------

def _wait_for(predicate, proc, timeout=300, poll=0.002):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(poll)
  return False


def _steps_logged(workdir):
  path = workdir / 'metrics.jsonl'
  return sum(1 for line in open(path) if '"loss"' in line) if path.exists() else 0


def _saving(workdir):
  """An async save in flight: orbax writes a step into a temporary directory, then renames it."""
  directory = workdir / 'checkpoints'
  return directory.exists() and any('tmp' in d for d in os.listdir(directory))


def test_kill_9_and_sigterm_at_random_moments_resume_bitwise(clip_run, tmp_path):
  """SIGTERM once, then kill -9 mid-save and at a random moment, then run to the end: the final
  params and metrics are those of the uninterrupted shared run, bit for bit."""
  seed = int(time.time())
  rng = random.Random(seed)
  seed_note = f'random moments from seed {seed}'
  data_dir = shared_runs.data_dir()
  workdir = tmp_path / 'interrupted'
  run = lambda: cli(CLIP_RUN[0], workdir, data_dir, *CLIP_RUN[1], wait=False)
  interruptions = []

  # 1. SIGTERM once training is under way: a checkpoint at the next step boundary, exit 128+15.
  proc = run()
  assert _wait_for(lambda: _steps_logged(workdir) >= 1, proc), proc.communicate()[0]
  time.sleep(rng.uniform(0, 0.5))
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, out
  stopped = ckpt.Checkpointer(str(workdir), max_to_keep=2, async_save=False).latest_step()
  assert stopped is not None and stopped < 120, out
  interruptions.append(f'SIGTERM -> checkpoint {stopped}')

  # 2. kill -9 while an async save is in flight (else at a random step), 3. at a random moment.
  for mid_save in (True, False):
    proc = run()
    before = _steps_logged(workdir)
    target = before + rng.randint(1, 3)
    assert _wait_for(lambda: _steps_logged(workdir) >= target, proc), proc.communicate()[0]
    hit = _wait_for(lambda: _saving(workdir), proc, timeout=3) if mid_save else False
    if not mid_save:
      time.sleep(rng.uniform(0, 0.3))
    assert proc.poll() is None, 'the run ended before it could be killed'
    proc.kill()
    out, _ = proc.communicate(timeout=60)
    assert 'resumed from' in out, out
    interruptions.append(f'kill -9 {"mid-save" if hit else "between saves"} after '
                         f'{_steps_logged(workdir)} logged steps')

  final = cli(*CLIP_RUN[:1], workdir, data_dir, *CLIP_RUN[1])
  assert final.returncode == 0, final.stdout + final.stderr
  # The killed run's lock died with it; the next run took it over and said so.
  assert 'took over the lock of a run that ended without releasing it' in final.stdout
  print(seed_note, interruptions)
  a = json.load(open(clip_run / 'final_metrics.json'))
  b = json.load(open(workdir / 'final_metrics.json'))
  for key in a:
    if not key.endswith('/seconds'):
      assert a[key] == b[key], (key, a[key], b[key], interruptions)
  pa, pb = ckpt.load_params(str(clip_run)), ckpt.load_params(str(workdir))
  for path, value in ckpt.flatten(pa).items():
    np.testing.assert_array_equal(value, ckpt.flatten(pb)[path], err_msg=f'{path} {interruptions}')


# -- non-finite losses ----------------------------------------------------------------------------

def test_nonfinite_stop_names_the_step_and_keeps_the_checkpoints_before_it(tmp_path):
  """The issue's case: a learning rate of 1e6. The loss goes NaN within a few steps; the run
  stops at the next log or checkpoint step with one line, and every checkpoint is finite."""
  workdir = tmp_path / 'nan'
  run = cli('shapes_clip.py', workdir, shared_runs.data_dir(), *SMALL, '--config.total_steps=60',
            '--config.optim.lr=1e6', '--config.optim.warmup_steps=1', '--config.log_every=5',
            '--config.checkpoint.every=2', '--config.checkpoint.max_to_keep=1')
  assert run.returncode == 1, run.stdout + run.stderr
  assert 'Traceback' not in run.stdout + run.stderr, run.stderr
  line = run.stderr.strip().splitlines()[-1]
  assert line.startswith('mmfusion: step ') and 'non-finite loss' in line, line
  bad_step = int(line.split()[2].rstrip(':'))
  saved = ckpt.Checkpointer(str(workdir), max_to_keep=1, async_save=False).all_steps()
  assert saved and max(saved) < bad_step, (saved, line)
  assert f'checkpoints/{max(saved)}' in line, line
  for path, value in ckpt.flatten(ckpt.load_params(str(workdir))).items():
    assert np.isfinite(value).all(), path
  assert not (workdir / 'final_metrics.json').exists()


def _inject_nan_and_break_an_evaluator(trainer, monkeypatch, nan_step):
  """The training stream's batch `nan_step` gets NaN pixels; the retrieval evaluator raises."""
  from mmfusion.data import training as training_data
  real = training_data.batches

  def batches(source, batch_sharding, start_step=0):
    for step, batch in enumerate(real(source, batch_sharding, start_step), start_step + 1):
      if step == nan_step:
        batch = {**batch, 'image': batch['image'] * np.nan}
      yield batch
  monkeypatch.setattr(training_data, 'batches', batches)

  def broken(params):
    raise RuntimeError('retrieval broke')
    yield
  monkeypatch.setattr(trainer.evaluators['retrieval'], 'run', broken)


def test_skip_drops_the_nonfinite_update_and_a_failing_evaluator_costs_no_checkpoint(
    tmp_path, data_dir, monkeypatch):
  from configs import shapes_clip
  from mmfusion import train
  config = shapes_clip.get_config('smoke')
  with_flags(config, ['--config.total_steps=8', '--config.log_every=4',
                      '--config.checkpoint.every=4', '--config.train.nonfinite=skip',
                      '--config.evals.zeroshot.keep_if={}'])
  config.data.data_dir = str(data_dir)
  workdir = tmp_path / 'skip'
  trainer = train.Trainer(config, str(workdir))
  _inject_nan_and_break_an_evaluator(trainer, monkeypatch, nan_step=3)
  with pytest.raises(errors.RunFailed, match=r"trained to step 8 and saved the checkpoint .*/8, "
                     r"but evaluator\(s\) failed: retrieval: RuntimeError: retrieval broke"):
    trainer.run_and_close()
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  logged = [r for r in rows if 'loss' in r]
  assert [r['skipped_steps'] for r in logged] == [1, 1]
  assert all(np.isfinite(r['loss']) for r in logged)
  final = json.load(open(workdir / 'final_metrics.json'))
  assert 'zeroshot/accuracy' in final and not any(k.startswith('retrieval/') for k in final)
  assert 'RuntimeError: retrieval broke' in (workdir / errors.ERROR_LOG).read_text()
  meta = ckpt.Checkpointer(str(workdir), max_to_keep=2, async_save=False).read_meta(8)
  assert meta['nonfinite_skipped'] == 1

  # The step itself: a NaN batch leaves params and optimizer state exactly as they were.
  program = trainer.program
  state = program.init_state(0)
  batch = {k: np.zeros(s.shape[1:], s.dtype)[None].repeat(config.batch_size, 0)
           for k, s in trainer.expected_batch.items()}
  batch['image'] = batch['image'] + np.nan
  before = ckpt.flatten({'p': jax_get(state.params), 'o': jax_get(state.opt_state)})
  state, metrics = program.train_step(state, batch)
  after = ckpt.flatten({'p': jax_get(state.params), 'o': jax_get(state.opt_state)})
  assert float(metrics['nonfinite']) == 1.0 and int(state.step) == 1
  for path, value in before.items():
    np.testing.assert_array_equal(value, after[path], err_msg=path)


def jax_get(tree):
  import jax
  return jax.tree.map(np.asarray, jax.device_get(
      {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}))


# -- damaged checkpoints --------------------------------------------------------------------------

def test_damaged_newest_checkpoint_falls_back_to_the_older_intact_one(clip_run, tmp_path, capsys):
  from mmfusion import train
  workdir = copy_run(clip_run, tmp_path)
  damage(workdir / 'checkpoints' / '120')
  trainer = train.Trainer(clip_config('--config.total_steps=130'), str(workdir))
  try:
    state, _ = trainer.create_state()
  finally:
    trainer.lock.release()
  assert int(state.step) == 110
  out = capsys.readouterr().out
  assert f'skipped damaged checkpoint {workdir}/checkpoints/120' in out, out
  assert 'Traceback' not in out
  assert (workdir / ckpt.DAMAGED_SUBDIR / '120' / 'state').is_dir()     # kept, not deleted
  assert trainer.checkpointer.all_steps() == [110]


# -- the workdir lock -----------------------------------------------------------------------------

def test_a_stale_lock_is_taken_over(tmp_path, data_dir, capsys):
  from configs import shapes_clip
  from mmfusion import train
  workdir = tmp_path / 'stale'
  workdir.mkdir()
  # What a kill -9'd run leaves: the record, with nobody holding the lock.
  (workdir / lock_lib.LOCK_FILE).write_text(json.dumps({'pid': 999999, 'host': 'h', 'since': 't'}))
  config = shapes_clip.get_config('smoke')
  config.unlock()
  config.data.data_dir = str(data_dir)
  trainer = train.Trainer(config, str(workdir))
  assert trainer.lock.held
  trainer.lock.release()
  assert 'took over the lock of a run that ended without releasing it (pid 999999' in (
      capsys.readouterr().out)


def test_verbose_prints_the_traceback_and_the_log_keeps_it(tmp_path, capfd):
  def fail():
    raise ZeroDivisionError('deep inside')
  for verbose in (False, True):
    with pytest.raises(SystemExit) as exit:
      with errors.one_line('mmfusion', str(tmp_path), verbose=verbose):
        fail()
    _, err = capfd.readouterr()
    assert ('Traceback' in err) == verbose, err
    assert str(exit.value.code).startswith('mmfusion: ZeroDivisionError: deep inside')
  log = (tmp_path / errors.ERROR_LOG).read_text()
  assert log.count('ZeroDivisionError: deep inside') == 2 and 'in fail' in log


# -- bad inputs: one line each ------------------------------------------------------------------

def _smoke(data_dir, *flags):
  from configs import shapes_clip
  config = with_flags(shapes_clip.get_config('smoke'), flags)
  config.data.data_dir = str(data_dir)
  return config


# name -> (how the case is made: (ctx) -> (config, workdir), what the line must say). `ctx` has
# data_dir, tmp_path, clip_run (the shared CLIP run's workdir).
BAD_INPUTS = {
    # config
    'mesh_too_big': (lambda c: (_smoke(c.data_dir, '--config.mesh.data=3'), c.new()),
                     'config.mesh'),
    'fsdp_without_devices': (lambda c: (_smoke(c.data_dir, '--config.mesh.fsdp=2',
                                               '--config.mesh.data=1'), c.new()), 'config.mesh'),
    'batch_zero': (lambda c: (_smoke(c.data_dir, '--config.batch_size=0'), c.new()),
                   'config.batch_size = 0: must be > 0'),
    'total_steps_zero': (lambda c: (_smoke(c.data_dir, '--config.total_steps=0'), c.new()),
                         'config.total_steps = 0: must be > 0'),
    'nonfinite_value': (lambda c: (_smoke(c.data_dir, '--config.train.nonfinite=ignore'),
                                   c.new()),
                        "config.train.nonfinite = 'ignore': must be one of ('stop', 'skip')"),
    'freeze_unknown': (lambda c: (_smoke(c.data_dir, "--config.freeze=('imagee',)"), c.new()),
                       "config.freeze names 'imagee'"),
    'objective_without_input': (
        lambda c: (_smoke(c.data_dir, "--config.data.inputs=('image', 'label')"), c.new()),
        "config.objectives.softmax_contrastive binds 'text', which the batch lacks"),
    'unknown_input': (
        lambda c: (_smoke(c.data_dir, "--config.data.inputs=('image', 'text', 'sound')"),
                   c.new()), "config.data.inputs names ['sound']"),
    'bad_pool': (lambda c: (_smoke(c.data_dir, '--config.model.towers.image.pool=max'), c.new()),
                 'config.model.towers.image'),
    'eval_pair': (lambda c: (_smoke(c.data_dir, "--config.evals.retrieval.pair=('image', 'audio')"),
                             c.new()), "config.evals.retrieval.pair = 'audio'"),
    'eval_type': (lambda c: (_smoke(c.data_dir, '--config.evals.retrieval.type=retrieve'), c.new()),
                  'config.evals.retrieval'),
    'sharding_preset': (lambda c: (_smoke(c.data_dir, '--config.sharding.preset=zero3'), c.new()),
                        'zero3'),
    # data
    'dataset_unknown': (lambda c: (_smoke(c.data_dir, '--config.data.name=not_a_dataset'),
                                   c.new()), 'not_a_dataset'),
    'tokenizer_missing': (lambda c: (_smoke(c.data_dir, '--config.tokenizer.model=/no/spm.model'),
                                     c.new()), '/no/spm.model'),
    'smaller_than_a_batch': (lambda c: (_smoke(c.data_dir, '--config.batch_size=512'), c.new()),
                             'config.batch_size = 512: the train split'),
    'train_split_unknown': (lambda c: (_smoke(c.data_dir, '--config.data.train_split=training'),
                                       c.new()), "Unknown split 'training'"),
    'eval_split_unknown': (lambda c: (_smoke(c.data_dir, '--config.evals.retrieval.split=val'),
                                      c.new()), "config.evals.retrieval: split 'val'"),
    'keep_if_unknown': (lambda c: (_smoke(c.data_dir, "--config.evals.zeroshot.keep_if={'n': 1}"),
                                   c.new()), "zeroshot: keep_if: 'n' is not a scalar feature"),
    # own data (config.data.name = 'files:PATH', data/files.py)
    'manifest_missing': (lambda c: (c.own('/no/captions.jsonl'), c.new()),
                         '/no/captions.jsonl does not exist'),
    'manifest_bad_json': (lambda c: (c.own(c.manifest(['{"image": "0.png", "caption": "a"}',
                                                        '{"image": "1.png" "caption"}'])),
                                     c.new()), 'captions.jsonl, line 2: not valid JSON'),
    'manifest_too_many_bad_files': (
        lambda c: (c.own(c.manifest([{'image': f'{i}.png', 'caption': f'c {i}'}
                                     for i in range(10)], images=6)), c.new()),
        '4 of 10 images (40%) have a missing or unreadable file'),
    'label_input_without_labels': (
        lambda c: (c.own(c.manifest([{'image': f'{i}.png', 'caption': f'c {i}'}
                                     for i in range(10)], images=10),
                         "--config.data.inputs=('image', 'text', 'label')"), c.new()),
        "config.data.inputs has 'label', which reads features ['label']"),
    # checkpoints
    'init_from_missing': (lambda c: (_smoke(c.data_dir, '--config.init_from.path=/no/run'),
                                     c.new()), '/no/run'),
    'init_from_other_architecture': (
        lambda c: (_smoke(c.data_dir, f'--config.init_from.path={c.clip_run}',
                          '--config.model.towers.image.width=64'), c.new()),
        'does not match the model'),
    'only_checkpoint_damaged': (lambda c: (clip_config('--config.total_steps=130'),
                                           c.clip_copy(damaged=(110, 120))),
                                'restores: step 120: NOT_FOUND'),
    # resume
    'resume_other_architecture': (
        lambda c: (clip_config('--config.total_steps=130', '--config.model.towers.image.width=64'),
                   c.clip_copy()), 'model.towers.image.width: 96 -> 64'),
    'resume_clip_with_siglip': (
        lambda c: (_siglip_on_clip(), c.clip_copy()), 'objectives.sigmoid_contrastive'),
    'resume_other_batch': (lambda c: (clip_config('--config.total_steps=130',
                                                  '--config.batch_size=32'), c.clip_copy()),
                           'batch_size: 64 -> 32'),
    'resume_below_saved_step': (lambda c: (clip_config('--config.total_steps=10'), c.clip_copy()),
                                'config.total_steps = 10 is below the step of the checkpoint'),
    # the workdir
    'workdir_in_use': (lambda c: (_smoke(c.data_dir), c.in_use(c.new())),
                       f'is in use by another run (pid {os.getpid()}'),
}


def _siglip_on_clip():
  from configs import shapes_siglip
  config = with_flags(shapes_siglip.get_config(), [*CLIP_RUN[1], '--config.total_steps=130'])
  config.data.data_dir = shared_runs.data_dir()
  return config


class _Context:
  """What a case is made from: the tiny dataset, a fresh workdir, the shared CLIP run."""

  def __init__(self, data_dir, tmp_path):
    self.data_dir, self.tmp_path = data_dir, tmp_path
    self.locks = []

  @property
  def clip_run(self):
    return pathlib.Path(shared_runs.workdir('clip'))

  def new(self):
    return self.tmp_path / 'run'

  def own(self, path, *flags):
    """configs/own_clip.py on `path`, a few steps."""
    from configs import own_clip
    config = with_flags(own_clip.get_config(f'data={path}'), [
        '--config.total_steps=2', *flags])
    config.data.data_dir = str(self.tmp_path / 'own_data')
    return config

  def manifest(self, rows, images=0):
    """A captions.jsonl of `rows` (dicts or raw lines) next to `images` PNGs 0.png, 1.png, ..."""
    import tensorflow as tf
    for i in range(images):
      pixels = np.full((8, 8, 3), 40 * i % 256, np.uint8)
      (self.tmp_path / f'{i}.png').write_bytes(tf.io.encode_png(pixels).numpy())
    path = self.tmp_path / 'captions.jsonl'
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
    return path

  def in_use(self, workdir):
    """`workdir`, held by another live run (here: this process, through another open file)."""
    self.locks.append(lock_lib.WorkdirLock(str(workdir)).acquire())
    return workdir

  def clip_copy(self, damaged=()):
    workdir = copy_run(self.clip_run, self.tmp_path)
    for step in damaged:
      damage(workdir / 'checkpoints' / str(step))
    return workdir


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_ends_in_one_line_without_a_traceback(case, data_dir, tmp_path, capfd):
  from mmfusion import train
  make, expected = BAD_INPUTS[case]
  context = _Context(data_dir, tmp_path)
  config, workdir = make(context)
  copied = (workdir / 'checkpoints').exists()
  try:
    with pytest.raises(SystemExit) as exit:
      with errors.one_line('mmfusion', str(workdir)):
        train.Trainer(config, str(workdir)).run_and_close()
  finally:
    for held in context.locks:
      held.release()
  message = str(exit.value.code)
  first, *rest = message.splitlines()
  out, err = capfd.readouterr()
  assert first.startswith('mmfusion: ') and expected in message, message
  assert all(line.startswith('  ') for line in rest), message    # a diff's lines, if any
  assert 'Traceback' not in out + err, out + err
  if not copied:     # failed in set-up: nothing was trained
    assert not list((workdir / 'checkpoints').glob('[0-9]*')), message
  else:
    # Nothing lost: the checkpoints the workdir held are all still there.
    assert sorted(os.listdir(workdir / 'checkpoints')) == sorted(
        os.listdir(context.clip_run / 'checkpoints')), message
