"""The speech configs through the real CLI on the tiny spoken dataset: tri-modal training with
retrieval for every pair and zero-shot from spoken prompts, then spoken VQA fine-tuned from it
with modality dropout and evaluated with the image absent."""
import json
import os

import pytest

import shared_runs
from cli_runs import cli

pytest.importorskip('espeakng_loader', reason="the speech engine comes with the [speech] extra")


@pytest.fixture(scope='module')
def trimodal():
  """The session's 30-step tri-modal run (tests/shared_runs.py)."""
  return shared_runs.workdir('trimodal')


@pytest.fixture(scope='module')
def data_dir(trimodal):
  """The tiny spoken dataset, as the tri-modal run rendered it (the speech engine is slow)."""
  return shared_runs.data_dir()


def test_trimodal_reports_every_pair_both_ways_and_spoken_zero_shot(trimodal):
  final = json.load(open(os.path.join(trimodal, 'final_metrics.json')))
  for direction in ('i2t', 't2i', 'i2a', 'a2i', 't2a', 'a2t'):
    for k in (1, 5, 10):
      assert 0.0 <= final[f'retrieval/{direction}_r{k}'] <= 1.0, final
  assert final['retrieval/num_audio'] == final['retrieval/num_image'] == 64
  assert final['retrieval/num_text'] == 5 * 64
  for prompts in ('text', 'audio'):
    assert final[f'zeroshot_{prompts}/num_examples'] > 0
    assert 0.0 <= final[f'zeroshot_{prompts}/accuracy'] <= 1.0
  config = json.load(open(os.path.join(trimodal, 'config.json')))
  assert config['model']['towers']['audio']['type'] == 'ast'


def test_spoken_vqa_from_the_trimodal_run_answers_with_and_without_the_image():
  # The session's spoken-VQA run (tests/shared_runs.py): 20 steps from the tri-modal run,
  # modality dropout 0.3; the speech notebook reads it too.
  workdir = shared_runs.workdir('spoken_vqa')
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f"{shared_runs.workdir('trimodal')}" in f.read()
  final = json.load(open(os.path.join(workdir, 'final_metrics.json')))
  for name in ('vqa', 'vqa_no_image'):
    assert final[f'{name}/num_questions'] == 64        # one spoken question per test scene
    assert 0.0 <= final[f'{name}/accuracy'] <= 1.0


def test_speech_clip_trains_image_and_speech_without_text(data_dir, tmp_path):
  run = cli('shapes_speech_clip.py:smoke', tmp_path / 'speech_clip', data_dir,
            '--config.total_steps=10')
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  final = json.load(open(tmp_path / 'speech_clip' / 'final_metrics.json'))
  assert {k for k in final if k.startswith('retrieval/') and k.endswith('_r1')} == {
      'retrieval/i2a_r1', 'retrieval/a2i_r1'}
  assert 'zeroshot_audio/accuracy' in final and 'zeroshot_text/accuracy' not in final
