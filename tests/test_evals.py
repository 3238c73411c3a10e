"""Tests of mmfusion.evals: metrics against hand computations and brute-force references,
evaluators end to end with a table-lookup Flax model and a fake eval pipeline.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import types

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import mmfusion.data
from mmfusion import config as config_lib
from mmfusion import evals
from mmfusion.evals import metrics

IMAGE_SIZE = 2
MAX_LEN = 4


# ----------------------------------------------------------------------------- references


def ref_hits_by_permutation(sim, positive, ks):
  """Average over every candidate order of: stable sort by score, first positive < k."""
  out = np.zeros((len(ks), sim.shape[0]))
  for q in range(sim.shape[0]):
    perms = list(itertools.permutations(range(sim.shape[1])))
    for perm in perms:
      perm = np.array(perm)
      order = perm[np.argsort(-sim[q, perm], kind='stable')]
      first = np.flatnonzero(positive[q, order])[0]
      out[:, q] += [first < k for k in ks]
    out[:, q] /= len(perms)
  return out


def ref_macro_f1(pred, label, num_classes):
  """Precision/recall form, per class, skipping classes absent from both."""
  f1s = []
  for c in range(num_classes):
    tp = np.sum((pred == c) & (label == c))
    fp = np.sum((pred == c) & (label != c))
    fn = np.sum((pred != c) & (label == c))
    if tp + fp + fn == 0:
      continue
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
  return float(np.mean(f1s))


def normalize(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- metrics


def test_recall_hand_case_with_a_tie():
  # The positive (0.5) has one negative above it and one tied with it: it is 2nd or 3rd.
  sim = np.array([[0.9, 0.5, 0.5, 0.1]])
  positive = np.array([[False, True, False, False]])
  assert metrics.recall_at_k(sim, positive, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_recall_constant_scores_give_chance_not_credit():
  sim = np.zeros((1, 8))
  one = np.eye(8, dtype=bool)[:1]
  assert metrics.recall_at_k(sim, one, (1, 2, 8)) == pytest.approx({1: 1 / 8, 2: 2 / 8, 8: 1.0})
  two = one | np.eye(8, dtype=bool)[1:2]
  # P(hit@2) = 1 - P(both first two are negatives) = 1 - (6/8)(5/7).
  assert metrics.recall_at_k(sim, two, (1, 2)) == pytest.approx({1: 2 / 8, 2: 1 - 30 / 56})


def test_recall_without_ties_matches_argsort():
  rng = np.random.default_rng(0)
  sim = rng.normal(size=(30, 40))
  positive = rng.random((30, 40)) < 0.08
  positive[np.arange(30), rng.integers(0, 40, 30)] = True
  ks = (1, 5, 10)
  first = np.array([np.flatnonzero(positive[q, np.argsort(-sim[q])])[0] for q in range(30)])
  expected = {k: float(np.mean(first < k)) for k in ks}
  assert metrics.recall_at_k(sim, positive, ks) == pytest.approx(expected)


def test_recall_with_ties_matches_average_over_candidate_orders():
  rng = np.random.default_rng(1)
  sim = rng.integers(0, 3, size=(12, 6)).astype(np.float32)   # many exact ties
  positive = rng.random((12, 6)) < 0.3
  positive[np.arange(12), rng.integers(0, 6, 12)] = True
  ks = (1, 2, 3, 5)
  np.testing.assert_allclose(metrics.retrieval_hits(sim, positive, ks),
                             ref_hits_by_permutation(sim, positive, ks), atol=1e-12)


@pytest.mark.parametrize('sim, positive, ks, match', [
    (np.zeros((2, 3)), np.array([[True, False, False], [False] * 3]), (1,), 'no positive'),
    (np.array([[np.nan, 0.0]]), np.array([[True, False]]), (1,), 'non-finite'),
    (np.zeros((2, 3)), np.ones((2, 4), bool), (1,), 'Nq, Nc'),
    (np.zeros((1, 3)), np.ones((1, 3), bool), (0,), 'positive ints'),
])
def test_recall_rejects_bad_input(sim, positive, ks, match):
  with pytest.raises(ValueError, match=match):
    metrics.recall_at_k(sim, positive, ks)


def test_confusion_accuracy_and_macro_f1_hand_case():
  label = np.array([0, 0, 1, 1, 2])
  pred = np.array([0, 1, 1, 1, 0])
  np.testing.assert_array_equal(metrics.confusion_matrix(pred, label, 4), [
      [1, 1, 0, 0],
      [0, 2, 0, 0],
      [1, 0, 0, 0],
      [0, 0, 0, 0],
  ])
  assert metrics.accuracy(pred, label) == pytest.approx(3 / 5)
  # F1: class 0 = 2/(2+1+1), class 1 = 4/(4+1), class 2 = 0; class 3 appears nowhere: left out.
  assert metrics.macro_f1(pred, label, 4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
  # A class that is only ever predicted counts (F1 = 0).
  assert metrics.macro_f1(np.array([3, 1]), np.array([1, 1]), 4) == pytest.approx((0 + 2 / 3) / 2)


def test_macro_f1_matches_reference_on_random_data():
  rng = np.random.default_rng(2)
  for _ in range(20):
    label = rng.integers(0, 5, 40)
    pred = np.where(rng.random(40) < 0.5, label, rng.integers(0, 6, 40))
    assert metrics.macro_f1(pred, label, 7) == pytest.approx(ref_macro_f1(pred, label, 7))


def test_classification_metrics_reject_bad_input():
  with pytest.raises(ValueError, match='outside'):
    metrics.macro_f1(np.array([0, 5]), np.array([0, 1]), 3)
  with pytest.raises(ValueError, match='empty'):
    metrics.accuracy(np.array([], int), np.array([], int))


# ----------------------------------------------------------------------------- fakes


class TableModel(nn.Module):
  """Embeddings looked up in param tables: image i -> image_table[pixel 0 of image i],
  text -> text_table[first token id]; logits = image embedding @ head.

  Tables of any shape are read with get_variable (never initialised): the tests give them.
  """

  @nn.compact
  def __call__(self, batch, train=False):
    assert not train, 'evaluators must run the model in inference mode'
    out = {'embeddings': {}, 'logit_scale': jnp.float32(10.0)}
    if 'image' in batch:
      table = self.get_variable('params', 'image_table')
      idx = batch['image'][:, 0, 0, 0].astype(jnp.int32)
      emb = table[idx]
      out['embeddings']['image'] = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
      out['logits'] = out['embeddings']['image'] @ self.get_variable('params', 'head')
    if 'text' in batch:
      table = self.get_variable('params', 'text_table')
      emb = table[batch['text'][:, 0]]
      out['embeddings']['text'] = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    return out


def table_params(image_table, text_table=None, head=None):
  dim = image_table.shape[1]
  return {
      'image_table': jnp.asarray(image_table, jnp.float32),
      'text_table': jnp.asarray(np.eye(1, dim) if text_table is None else text_table,
                                jnp.float32),
      'head': jnp.asarray(np.zeros((dim, 1)) if head is None else head, jnp.float32),
  }


class FakeTokenizer:
  """Each known text is one token: its index in `texts`."""

  def __init__(self, texts):
    self.vocab = {t: i for i, t in enumerate(texts)}

  def encode(self, texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    ids[:, 0] = [self.vocab[t] for t in texts]
    mask = np.zeros((len(texts), max_len), np.bool_)
    mask[:, 0] = True
    return ids, mask


def make_batches(labels, captions=None, batch_size=4, caption_valid=None):
  """Example i: image whose pixel 0 is i, label[i], captions[i] (one token id per caption).

  The last batch is padded to batch_size with copies of example 0 carrying a wrong label,
  marked _valid False: counted by mistake, they would change every metric.
  """
  labels = np.asarray(labels)
  n = len(labels)
  captions = np.zeros((n, 1), int) if captions is None else np.asarray(captions)
  k = captions.shape[1]
  caption_valid = np.ones((n, k), bool) if caption_valid is None else caption_valid
  batches = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    pad = batch_size - len(idx)
    take = np.concatenate([idx, np.zeros(pad, int)])
    image = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    image[:, 0, 0, 0] = take
    ids = np.zeros((batch_size, k, MAX_LEN), np.int32)
    ids[:, :, 0] = captions[take]
    mask = np.zeros((batch_size, k, MAX_LEN), np.bool_)
    mask[:, :, 0] = caption_valid[take]
    label = labels[take].astype(np.int32)
    label[len(idx):] = label[len(idx):] + 1
    batches.append(dict(
        image=image, captions=ids, captions_mask=mask, label=label,
        num_objects=np.ones(batch_size, np.int32),
        _valid=np.arange(batch_size) < len(idx)))
  return batches


@pytest.fixture
def pipeline(monkeypatch):
  """Replaces mmfusion.data.pipeline (real or not yet written) with a recording fake."""
  fake = types.ModuleType('mmfusion.data.pipeline')
  fake.batches, fake.names, fake.calls = [], [], []

  def eval_batches(config, split, tokenizer, batch_size, keep_if=None):
    fake.calls.append(dict(split=split, batch_size=batch_size, keep_if=keep_if))
    for batch in fake.batches:
      assert batch['image'].shape[0] == batch_size
      yield {k: v.copy() for k, v in batch.items()}

  fake.eval_batches = eval_batches
  fake.class_names = lambda config: list(fake.names)
  monkeypatch.setitem(sys.modules, 'mmfusion.data.pipeline', fake)
  monkeypatch.setattr(mmfusion.data, 'pipeline', fake, raising=False)
  return fake


def make_config(num_classes=0):
  config = config_lib.base()
  config.tokenizer.max_len = MAX_LEN
  config.model.head.num_classes = num_classes
  return config


def run(evaluator, params):
  results = dict(evaluator.run(params))
  assert all(type(v) is float for v in results.values()), results
  return results


# ----------------------------------------------------------------------------- zeroshot


CLASSES = ['red circle', 'blue square', 'green triangle']
TEMPLATES = ('a {}.', 'a picture of a {}.')


def zeroshot_setup(pipeline, labels, templates=TEMPLATES, classes=CLASSES, batch_size=4):
  pipeline.names = classes
  pipeline.batches = make_batches(labels, batch_size=batch_size)
  prompts = [t.format(c) for t in templates for c in classes]   # not the evaluator's order
  tokenizer = FakeTokenizer(prompts)
  evaluator = evals.build('zs', dict(type='zeroshot', every=10, split='test',
                                     batch_size=batch_size, keep_if={'num_objects': 1},
                                     templates=templates),
                          model=TableModel(), config=make_config(), tokenizer=tokenizer)
  return evaluator, tokenizer


def test_zeroshot_perfect_model_and_padding_ignored(pipeline):
  labels = np.array([0, 1, 2, 2, 1, 0, 1])                         # 2 batches, 1 padding row
  evaluator, tokenizer = zeroshot_setup(pipeline, labels)
  text_table = np.zeros((len(tokenizer.vocab), 3))
  for prompt, i in tokenizer.vocab.items():
    text_table[i, [c in prompt for c in CLASSES].index(True)] = 1.0
  results = run(evaluator, table_params(np.eye(3)[labels], text_table))
  assert results == {'accuracy': 1.0, 'macro_f1': 1.0, 'num_examples': 7.0}
  assert pipeline.calls == [dict(split='test', batch_size=4, keep_if={'num_objects': 1})]


def test_zeroshot_averages_templates_and_renormalises(pipeline):
  # Image of class 0 = e0. Class 0's prompts disagree (e0, e2): mean (e0+e2)/2, score 0.5,
  # 0.707 once renormalised. Class 1's prompts agree on 0.6 e0 + 0.8 e1: score 0.6.
  # Only the renormalised ensemble picks class 0.
  classes = ['red circle', 'blue square']
  evaluator, tokenizer = zeroshot_setup(pipeline, np.array([0]), classes=classes)
  rows = {'a red circle.': [1, 0, 0], 'a picture of a red circle.': [0, 0, 1],
          'a blue square.': [0.6, 0.8, 0], 'a picture of a blue square.': [0.6, 0.8, 0]}
  text_table = np.array([rows[p] for p in sorted(tokenizer.vocab, key=tokenizer.vocab.get)])
  assert run(evaluator, table_params(np.eye(3)[[0]], text_table))['accuracy'] == 1.0


def test_zeroshot_matches_numpy_reference(pipeline):
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, 23)
  evaluator, tokenizer = zeroshot_setup(pipeline, labels, batch_size=5)
  image_table = rng.normal(size=(23, 4))
  text_table = rng.normal(size=(len(tokenizer.vocab), 4))
  text = normalize(text_table)
  classes = normalize(np.stack([
      np.mean([text[tokenizer.vocab[t.format(c)]] for t in TEMPLATES], axis=0)
      for c in CLASSES]))
  pred = np.argmax(normalize(image_table) @ classes.T, axis=1)
  results = run(evaluator, table_params(image_table, text_table))
  assert results['accuracy'] == pytest.approx(np.mean(pred == labels))
  assert results['macro_f1'] == pytest.approx(ref_macro_f1(pred, labels, 3))
  assert 0 < results['accuracy'] < 1                               # the case is informative
  # Same evaluator, other params: the second run recomputes the class embeddings.
  assert run(evaluator, table_params(image_table, -text_table))['accuracy'] != pytest.approx(
      results['accuracy'])


# ----------------------------------------------------------------------------- retrieval


def retrieval_evaluator(batch_size=4):
  return evals.build('ret', dict(type='retrieval', every=0, split='validation',
                                 batch_size=batch_size, keep_if={}),
                     model=TableModel(), config=make_config(), tokenizer=None)


def test_retrieval_perfect_model(pipeline):
  n, k = 6, 2
  captions = np.arange(n * k).reshape(n, k)
  pipeline.batches = make_batches(np.zeros(n, int), captions)
  text_table = np.eye(n)[np.arange(n * k) // k]                   # caption (i, j) -> e_i
  results = run(retrieval_evaluator(), table_params(np.eye(n), text_table))
  assert results == {'i2t_r1': 1.0, 'i2t_r5': 1.0, 'i2t_r10': 1.0,
                     't2i_r1': 1.0, 't2i_r5': 1.0, 't2i_r10': 1.0,
                     'num_images': 6.0, 'num_captions': 12.0}
  assert pipeline.calls == [dict(split='validation', batch_size=4, keep_if=None)]


def test_retrieval_permuted_model_hand_computed(pipeline):
  # 4 images (e_i), 2 captions each; images 0 and 1 have their captions swapped (both of
  # image 0's captions embed to e_1 and vice versa). Every score is exactly 0 or 1.
  n, k = 4, 2
  captions = np.arange(n * k).reshape(n, k)
  pipeline.batches = make_batches(np.zeros(n, int), captions, batch_size=3)
  swap = np.array([1, 0, 2, 3])
  text_table = np.eye(n)[swap[np.arange(n * k) // k]]
  results = run(retrieval_evaluator(batch_size=3), table_params(np.eye(n), text_table))
  # i2t, image 0: the 2 captions of image 1 score 1 (above); its own 2 captions tie at 0
  # with the 4 of images 2 and 3. Hit@1: 0. Hit@5: 3 slots for a 6-way tie holding 2
  # positives, miss = (4/6)(3/5)(2/4) = 0.2 -> 0.8. Hit@10: 1. Image 1 alike; 2, 3 perfect.
  # t2i, a caption of image 0: image 1 scores 1, image 0 ties at 0 with images 2 and 3.
  # Hit@1: 0, hit@5: 1 (4 slots >= 3 tied). Captions of images 2, 3 are perfect.
  assert results == pytest.approx({'i2t_r1': 0.5, 'i2t_r5': 0.9, 'i2t_r10': 1.0,
                                   't2i_r1': 0.5, 't2i_r5': 1.0, 't2i_r10': 1.0,
                                   'num_images': 4.0, 'num_captions': 8.0})


def test_retrieval_matches_argsort_reference_and_skips_padding_captions(pipeline):
  rng = np.random.default_rng(4)
  n, k, dim = 14, 3, 6
  captions = np.arange(n * k).reshape(n, k)
  caption_valid = np.ones((n, k), bool)
  caption_valid[[2, 9], 2] = False                                 # images with 2 captions
  pipeline.batches = make_batches(np.zeros(n, int), captions, batch_size=4,
                                  caption_valid=caption_valid)
  image_table = rng.normal(size=(n, dim))
  text_table = image_table[np.arange(n * k) // k] + 1.2 * rng.normal(size=(n * k, dim))
  results = run(retrieval_evaluator(), table_params(image_table, text_table))

  image, text = normalize(image_table), normalize(text_table)[captions[caption_valid]]
  owner = np.nonzero(caption_valid)[0]
  i2t_first = [np.flatnonzero(owner[np.argsort(-(text @ image[i]))] == i)[0] for i in range(n)]
  t2i_pos = [np.flatnonzero(np.argsort(-(image @ t)) == o)[0] for t, o in zip(text, owner)]
  for kk in (1, 5, 10):
    assert results[f'i2t_r{kk}'] == pytest.approx(np.mean(np.array(i2t_first) < kk))
    assert results[f't2i_r{kk}'] == pytest.approx(np.mean(np.array(t2i_pos) < kk))
  assert results['num_images'] == 14.0 and results['num_captions'] == 40.0
  assert 0 < results['i2t_r1'] < 1 and 0 < results['t2i_r1'] < 1  # the case is informative


def test_retrieval_rejects_image_without_captions(pipeline):
  caption_valid = np.array([[True], [False]])
  pipeline.batches = make_batches(np.zeros(2, int), np.array([[0], [1]]),
                                  caption_valid=caption_valid)
  with pytest.raises(ValueError, match=r'config.evals.ret: 1 images .* no caption'):
    run(retrieval_evaluator(), table_params(np.eye(2), np.eye(2)))


# ----------------------------------------------------------------------------- classification


def classification_evaluator(num_classes):
  return evals.build('cls', dict(type='classification', every=5, split='test', batch_size=4),
                     model=TableModel(), config=make_config(num_classes), tokenizer=None)


def test_classification_perfect_head_and_padding_ignored(pipeline):
  labels = np.array([0, 1, 2, 3, 1, 2])
  pipeline.batches = make_batches(labels)
  results = run(classification_evaluator(4), table_params(np.eye(4)[labels], head=np.eye(4)))
  assert results == {'accuracy': 1.0, 'macro_f1': 1.0, 'num_examples': 6.0}


def test_classification_matches_numpy_reference(pipeline):
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, 19)
  pipeline.batches = make_batches(labels)
  image_table, head = rng.normal(size=(19, 5)), rng.normal(size=(5, 4))
  pred = np.argmax(normalize(image_table) @ head, axis=1)
  results = run(classification_evaluator(4), table_params(image_table, head=head))
  assert results['accuracy'] == pytest.approx(np.mean(pred == labels))
  assert results['macro_f1'] == pytest.approx(ref_macro_f1(pred, labels, 4))


def test_classification_head_sized_from_the_dataset(pipeline):
  # num_classes=-1 ("as many as the dataset's labels") is resolved from class_names at run.
  pipeline.names = ['a', 'b', 'c']
  pipeline.batches = make_batches(np.array([0, 1, 2]))
  results = run(classification_evaluator(-1), table_params(np.eye(3), head=np.eye(3)))
  assert results['accuracy'] == 1.0


def test_classification_rejects_logits_of_the_wrong_width(pipeline):
  pipeline.batches = make_batches(np.array([0, 1]))
  with pytest.raises(ValueError, match=r'logits have shape .* expected \[batch, 4\]'):
    run(classification_evaluator(4), table_params(np.eye(3)[:2], head=np.eye(3)))


# ----------------------------------------------------------------------------- build


@pytest.mark.parametrize('entry, num_classes, match', [
    (dict(type='zero_shot', every=1), 0,
     r"config.evals.bad: unknown type 'zero_shot'; known types: captioning, classification, "
     'retrieval, vqa, zeroshot'),
    (dict(every=1), 0, r'config.evals.bad has no "type"'),
    (dict(type='retrieval', every=1, templates=('a {}.',)), 0,
     r"config.evals.bad: unknown key\(s\) \['templates'\] for type 'retrieval'"),
    (dict(type='zeroshot', every=1, batchsize=8), 0, r"unknown key\(s\) \['batchsize'\]"),
    (dict(type='zeroshot', every=-1), 0, 'config.evals.bad: every must be'),
    (dict(type='zeroshot', every=1, batch_size=0), 0, 'config.evals.bad: batch_size must be'),
    (dict(type='zeroshot', every=1, templates='a {}.'), 0, 'templates must be a non-empty'),
    (dict(type='zeroshot', every=1, templates=('a photo',)), 0, "exactly one '{}'"),
    (dict(type='zeroshot', every=1, keep_if=1), 0, 'keep_if must be a dict'),
    (dict(type='retrieval', every=1, split=''), 0, 'split must be'),
    (dict(type='classification', every=1), 0, 'needs a classification head'),
])
def test_build_rejects_bad_entries_before_any_compute(pipeline, entry, num_classes, match):
  with pytest.raises(ValueError, match=match):
    evals.build('bad', entry, model=TableModel(), config=make_config(num_classes),
                tokenizer=None)
  assert pipeline.calls == []


def test_build_accepts_the_base_config_entries(pipeline):
  config = make_config()
  built = {name: evals.build(name, config.evals[name], model=TableModel(), config=config,
                             tokenizer=None) for name in config.evals}
  for name, evaluator in built.items():
    assert isinstance(evaluator, evals.REGISTRY[config.evals[name].type])
  assert built['zeroshot'].keep_if == {'num_objects': 1}
  assert built['zeroshot'].templates == config.evals.zeroshot.templates
  assert built['retrieval'].keep_if is None             # keep_if={} means keep everything
  assert pipeline.calls == []


def test_empty_split_is_an_error(pipeline):
  pipeline.batches = []
  with pytest.raises(ValueError, match="config.evals.cls: split 'test' gave no examples"):
    run(classification_evaluator(2), table_params(np.eye(2), head=np.eye(2)))


def test_importing_evals_does_not_import_the_pipeline():
  code = ('import sys, mmfusion.evals; '
          'assert "mmfusion.data.pipeline" not in sys.modules, "pipeline imported eagerly"')
  subprocess.run([sys.executable, '-c', code], check=True)
