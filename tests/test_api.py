"""The public API (mmfusion.load_run and Run): a run's own evaluation figures reproduced exactly
through it, the fused heads on plain inputs, heat-maps and the pointing game on a trained run,
and one clear error for each kind of bad input."""
import json
import os

import numpy as np
import pytest

import jax

import mmfusion
import shared_runs
from mmfusion import api
from mmfusion import config as config_lib
from mmfusion import pointing
from mmfusion.evals import metrics
from mmfusion.models import model as model_lib


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def trained():
  """The session's CLIP run (tests/shared_runs.py, evaluated at the end) and the run loaded
  back through the API."""
  workdir = shared_runs.workdir('clip')
  final = json.load(open(os.path.join(workdir, 'final_metrics.json')))
  return workdir, final, mmfusion.load_run(workdir, data_dir=shared_runs.data_dir())


def test_load_run_reproduces_the_runs_zeroshot_accuracy_exactly(trained):
  _, final, run = trained
  zs = run.config.evals.zeroshot
  single = run.examples(zs.split, keep_if=dict(zs.keep_if))
  result = run.zeroshot(single['image'], run.source.class_names(), prompts=zs.templates)
  assert len(single['label']) == final['zeroshot/num_examples']
  assert float(np.mean(result.predictions == single['label'])) == pytest.approx(
      final['zeroshot/accuracy'], abs=1e-6)
  assert result.scores.shape == (len(single['label']), len(run.source.class_names()))


def test_load_run_reproduces_the_runs_recall_exactly(trained):
  _, final, run = trained
  val = run.examples(run.config.evals.retrieval.split)
  captions = [c for cs in val['captions'] for c in cs]
  owner = np.repeat(np.arange(len(val['image'])), [len(cs) for cs in val['captions']])
  found = run.retrieve(list(val['image']), captions, k=10)
  positive = owner[None, :] == np.arange(len(val['image']))[:, None]
  i2t = metrics.retrieval_hits(found.similarity, positive, (1, 5, 10)).mean(axis=1)
  t2i = metrics.retrieval_hits(found.similarity.T, positive.T, (1, 5, 10)).mean(axis=1)
  for k, a, b in zip((1, 5, 10), i2t, t2i):
    assert a == pytest.approx(final[f'retrieval/i2t_r{k}'], abs=1e-6)
    assert b == pytest.approx(final[f'retrieval/t2i_r{k}'], abs=1e-6)
  # The top-k are the best of the full score matrix, best first.
  np.testing.assert_allclose(found.scores[:, 0], found.similarity.max(axis=1), rtol=1e-6)
  assert np.all(np.diff(found.scores, axis=1) <= 1e-7)


def test_embed_takes_pil_grey_and_other_sizes_like_the_pipeline(trained):
  from PIL import Image
  _, _, run = trained
  image = run.examples('test', n=1)['image'][0]                  # 64 px, the dataset's size
  z = run.embed(image=[image])
  np.testing.assert_allclose(run.embed(image=[Image.fromarray(image)]), z, atol=1e-6)
  np.testing.assert_allclose(run.embed(image=image), z, atol=1e-6)     # one image, no list
  rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=-1)
  np.testing.assert_allclose(run.embed(image=[rgba]), z, atol=1e-6)
  grey = run.embed(image=[image.mean(-1).astype(np.uint8)])
  assert grey.shape == z.shape and np.allclose(np.linalg.norm(grey, axis=-1), 1, atol=1e-5)
  both = run.embed(image=[image], text=['a red circle'])
  assert set(both) == {'image', 'text'}


def test_explain_and_the_pointing_game_on_a_trained_run(trained):
  _, _, run = trained
  result = pointing.play(run, 'test', limit=6)
  assert result['trials'] == 12
  assert set(result['rates']) == {'rollout (similarity)', 'chefer (similarity)',
                                  'chance (area fraction)', 'centre prior'}
  assert all(0 <= r <= 1 for r in result['rates'].values())
  scenes = pointing.scenes('test', run.config.data.builder_config, limit=2)
  e = run.explain('chefer', image=[s['image'] for s in scenes],
                  text=[pointing.phrase(s['objects'][0]) for s in scenes])
  assert e.heatmap.shape == (2, 4, 4) and e.modality == 'image' and e.target == 'similarity'
  assert np.isclose(e.heatmap.max(), 1.0) and e.heatmap.min() >= 0


def test_pointing_game_scores_against_hand_counted_patches():
  masks = np.zeros((2, 8, 8), np.float32)
  masks[0, :4, :4] = 1                    # object 0 fills the top-left patch of a 2x2 grid
  masks[1, 4:, 4:] = 1
  masks[1, 3, 3] = 1                      # one pixel of object 1 in object 0's patch
  owners = pointing.patch_owners(masks, (2, 2))
  np.testing.assert_array_equal(owners, [[0, -1], [-1, 1]])
  heat = np.array([[[1.0, 0], [0, 0]], [[0.5, 0.5], [0.5, 0.5]]])
  hits = pointing.score(heat, np.stack([owners, owners]), np.array([0, 1]))
  np.testing.assert_allclose(hits, [1.0, 0.25])          # a 4-way tie shares the credit
  assert pointing.centre_patches((3, 3)).sum() == 1 and pointing.centre_patches((2, 2)).all()


def test_the_fused_heads_on_plain_inputs(data_dir):
  """caption / answer / match on an untrained model: shapes, vocabularies, and ITM equal to
  the head applied by hand."""
  config = config_lib.load_file('configs/shapes_albef.py', 'smoke')
  config.unlock()
  config.data.data_dir = str(data_dir)
  config.model.heads.caption = dict(target='text', context='image', depth=1)
  config.model.heads.vqa = dict(question='text', context='image', answers=-1)
  config.data.inputs = ('image', 'text', 'question')       # so that init builds every head
  run0 = api.Run(config_lib.resolve(config, api.sources.Source(config)), {}, batch_size=4)
  params = run0.model.init(jax.random.key(0), {
      k: np.zeros(v.shape, v.dtype) for k, v in _init_batch(run0).items()})['params']
  run = api.Run(run0.config, params, batch_size=4)
  ex = run.examples('test', n=5)
  texts = [c[0] for c in ex['captions']]
  p = run.match(ex['image'], texts)
  assert p.shape == (5,) and np.all((p >= 0) & (p <= 1))
  entries = {**run.inputs('image', ex['image']), **run.inputs('text', texts)}
  encoded = {m: run.model.apply({'params': params}, m, entries[m], entries.get(f'{m}_mask'),
                                method=model_lib.MultimodalModel.encode) for m in ('image', 'text')}
  logits = run.model.apply({'params': params}, 'itm', encoded,
                           method=model_lib.MultimodalModel.fused_logits)
  np.testing.assert_allclose(p, jax.nn.softmax(logits)[:, 1], atol=1e-5)
  captions = run.caption(ex['image'])
  assert len(captions) == 5 and all(isinstance(c, str) for c in captions)
  answers = run.answer(ex['image'], [q[0] for q in ex['questions']])
  assert len(answers) == 5 and set(answers) <= set(run.source.answers)
  e = run.explain('gradcam', image=ex['image'], text=texts)
  assert e.per_token.shape[:2] == (5, run.config.tokenizer.max_len)
  assert e.query_mask.shape == (5, run.config.tokenizer.max_len)


def _init_batch(run):
  from mmfusion import train
  return train.init_batch(run.config)


def test_bad_inputs_fail_with_one_clear_message(trained, tmp_path):
  workdir, _, run = trained
  with pytest.raises(api.RunError, match='does not exist'):
    mmfusion.load_run(str(tmp_path / 'nowhere'))
  with pytest.raises(api.RunError, match='has no checkpoint'):
    mmfusion.load_run(str(tmp_path))
  with pytest.raises(api.RunError, match='no checkpoint of step 7'):
    mmfusion.load_run(str(workdir), step=7)
  with pytest.raises(api.RunError, match=r'\[H, W, 1 or 3\]'):
    run.embed(image=[np.zeros((32, 32, 2), np.uint8)])
  with pytest.raises(api.RunError, match='empty'):
    run.embed(text=[])
  with pytest.raises(api.RunError, match="'caption' head"):
    run.caption(np.zeros((1, 32, 32, 3), np.uint8))
  with pytest.raises(api.RunError, match="'itm' head"):
    run.match(np.zeros((1, 32, 32, 3), np.uint8), ['a red circle'])
  with pytest.raises(api.RunError, match='unknown method'):
    run.explain('saliency', image=np.zeros((1, 32, 32, 3), np.uint8), text=['a'])
  with pytest.raises(api.RunError, match='no .audio. tower'):
    run.embed(audio=[np.zeros(100, np.float32)])
  with pytest.raises(api.RunError, match='exactly one'):
    run.zeroshot(np.zeros((1, 32, 32, 3), np.uint8), ['red circle'], prompts=('a photo',))


def test_evaluate_reproduces_the_final_metrics_and_int8_stays_close(trained, tmp_path):
  """Run.evaluate runs the run's own evaluators: the figures the training wrote at its end;
  the int8 export (python -m mmfusion.quantize) of the same run evaluates within a hair."""
  from mmfusion import quantize
  workdir, final, run = trained
  results = run.evaluate()
  for key, value in results.items():
    if not key.endswith('/seconds'):
      assert value == pytest.approx(final[key], abs=1e-6), key
  _, float_bytes, int8_bytes = quantize.export(workdir, str(tmp_path / 'int8'),
                                                data_dir=shared_runs.data_dir())
  assert 0.25 <= int8_bytes / float_bytes < 0.30
  int8 = mmfusion.load_run(str(tmp_path / 'int8'), data_dir=shared_runs.data_dir())
  quantized = int8.evaluate(['zeroshot'])
  assert abs(quantized['zeroshot/accuracy'] - final['zeroshot/accuracy']) <= 0.05, quantized
  with pytest.raises(api.RunError, match="not evaluators of this run"):
    run.evaluate(['nope'])
