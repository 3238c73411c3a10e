"""The fused configs (ALBEF, CoCa, VQA through fusion) end to end through the real CLI on a
small rendered dataset: each trains, evaluates with its own evaluators and writes its metrics.
"""
import json
import pathlib

import numpy as np
import pytest

import shared_runs
from cli_runs import FUSED, RUN, cli, metrics
from mmfusion import checkpoint as ckpt


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def albef():
  """The session's 10-step ALBEF run (tests/shared_runs.py): its checkpoint starts the VQA
  fine-tuning below."""
  return pathlib.Path(shared_runs.workdir('albef'))


def test_albef_trains_itc_itm_mlm_and_reranks_retrieval(albef):
  logged = [r for r in metrics(albef) if 'loss' in r][-1]
  for key in ('softmax_contrastive/loss', 'itm/loss', 'mlm/loss'):
    assert np.isfinite(logged[key]), logged
  assert logged['mlm/num_masked'] >= 1.0            # at least one scored token per text
  final = json.load(open(albef / 'final_metrics.json'))
  for key in ('i2t_r1', 'i2t_rerank_r1', 't2i_rerank_r10'):
    assert 0.0 <= final[f'retrieval/{key}'] <= 1.0, final
  # Re-ranking re-orders the top 8 only, so R@10 stays (up to how score ties at the 8th
  # place are credited).
  assert abs(final['retrieval/i2t_rerank_r10'] - final['retrieval/i2t_r10']) < 0.02


def test_coca_writes_captions_greedy_and_beam(tmp_path, data_dir):
  run = cli('shapes_coca.py', tmp_path, data_dir, *FUSED,
            '--config.evals.captioning.batch_size=128',
            '--config.evals.captioning_beam.batch_size=128')
  assert run.returncode == 0, run.stdout + run.stderr
  final = json.load(open(tmp_path / 'final_metrics.json'))
  for decode in ('captioning', 'captioning_beam'):
    assert final[f'{decode}/num_examples'] == 256      # the whole test split
    assert 0.0 <= final[f'{decode}/bleu4'] <= 1.0 and final[f'{decode}/mean_length'] > 0


def test_vqa_finetunes_towers_and_fusion_from_the_albef_run(albef, tmp_path, data_dir):
  run = cli(f'shapes_vqa.py:init={albef},steps=10', tmp_path, data_dir, *RUN,
            '--config.evals.vqa.batch_size=128')
  assert run.returncode == 0, run.stdout + run.stderr
  assert f'initialised all params from {albef}' in run.stdout, run.stdout
  tuned = ckpt.load_params(str(tmp_path))
  pretrained = ckpt.load_params(str(albef))
  # The fusion came from ALBEF: 10 Adam steps of lr <= 2e-3 move a weight by at most 0.02,
  # far less than a fresh init would differ by.
  moved = []
  for path, value in ckpt.flatten(pretrained['fusion']).items():
    change = np.abs(ckpt.flatten(tuned['fusion'])[path] - value).max()
    assert change <= 0.03, (path, change)
    moved.append(change > 0)
  assert any(moved)
  assert 'vqa' in tuned and 'itm' not in tuned
  final = json.load(open(tmp_path / 'final_metrics.json'))
  assert final['vqa/num_questions'] == 256 * 5 and 0.0 <= final['vqa/accuracy'] <= 1.0
  assert 0.0 < final['vqa/majority_baseline'] < 1.0
