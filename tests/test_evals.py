"""Tests of mmfusion.evals: metrics against hand computations and brute-force references,
evaluators end to end with a table-lookup Flax model, a fake source and fake eval batches.
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
import tensorflow_datasets as tfds

from mmfusion import config as config_lib
from mmfusion import evals
from mmfusion.data import evaluation
from mmfusion.data import ops
from mmfusion.data import sources
from mmfusion.evals import metrics
from mmfusion.evals import retrieval

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
  """Embeddings looked up in param tables: every modality m of the batch (its `<m>` entry,
  masks aside) -> <m>_table[first element of the example's entry]: image i -> image_table[pixel
  0 of image i], text -> text_table[first token id]. The classification logits are the
  `classify` modality's embedding @ head.

  Tables of any shape are read with get_variable (never initialised): the tests give them.
  """
  classify: str = 'image'

  @nn.compact
  def __call__(self, batch, train=False):
    assert not train, 'evaluators must run the model in inference mode'
    out = {'embeddings': {}, 'tokens': {}, 'masks': {}, 'pooled': {},
           'logit_scale': jnp.float32(10.0)}
    for m, x in batch.items():
      if m.endswith('_mask'):
        continue
      raw = self.get_variable('params', f'{m}_table')[
          x.reshape(x.shape[0], -1)[:, 0].astype(jnp.int32)]
      out['embeddings'][m] = raw / jnp.linalg.norm(raw, axis=-1, keepdims=True)
      # What the ITM head reads when retrieval re-ranks: the raw rows, one token each.
      out['pooled'][m], out['tokens'][m] = raw, raw[:, None]
      out['masks'][m] = jnp.ones((x.shape[0], 1), jnp.bool_)
    if self.classify in out['embeddings']:
      logits = out['embeddings'][self.classify] @ self.get_variable('params', 'head')
      out['classification'] = {'logits': logits}
    return out

  def fused_logits(self, head, encoded):
    """An ITM head: match logit (image tokens @ itm_table) . text pooled, no-match logit 0;
    NaN where a mask is off, so tower outputs paired up wrongly cannot go unnoticed."""
    assert head == 'itm' and sorted(encoded) == ['image', 'text'], (head, sorted(encoded))
    image, text = encoded['image'], encoded['text']
    match = jnp.sum((image.tokens[:, 0] @ self.get_variable('params', 'itm_table'))
                    * text.pooled, axis=-1)
    match = jnp.where(image.mask[:, 0] & text.mask[:, 0], match, jnp.nan)
    return jnp.stack([jnp.zeros_like(match), match], axis=-1)


def table_params(image_table, text_table=None, head=None, **tables):
  """Params of TableModel; `tables`: more <name>_table entries (other modalities, itm)."""
  dim = image_table.shape[1]
  params = {
      'image_table': jnp.asarray(image_table, jnp.float32),
      'text_table': jnp.asarray(np.eye(1, dim) if text_table is None else text_table,
                                jnp.float32),
      'head': jnp.asarray(np.zeros((dim, 1)) if head is None else head, jnp.float32),
  }
  params.update({f'{name}_table': jnp.asarray(t, jnp.float32) for name, t in tables.items()})
  return params


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


class FakeSource:
  """What the evaluators read of a data.sources.Source: the config, the tokenizer, the
  features the image and text ops check, and the class names."""
  where = 'fake'

  def __init__(self, config, tokenizer=None, names=()):
    self.config = config
    self.tokenizer = tokenizer
    self.names = list(names)
    self.features = {'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                     'captions': tfds.features.Text()}

  def class_names(self):
    return list(self.names)

  op = sources.Source.op       # the real lookup: builds and checks the op against `features`


class InfraredOp(ops.Op):
  """A second non-text modality without an items axis: infrared float32 [B, 3]."""
  name = 'infrared'

  def spec(self, batch_size):
    return {'infrared': ((batch_size, 3), np.float32)}


class SpeechOp(ops.Op):
  """A non-text modality with an items axis in evaluation, like text: speech float32 [B, 3]
  and speech_mask [B, 3] in training, [B, K, 3] in evaluation."""
  name = 'speech'

  def spec(self, batch_size):
    return {'speech': ((batch_size, 3), np.float32), 'speech_mask': ((batch_size, 3), np.bool_)}


@pytest.fixture
def modalities(monkeypatch):
  """Registers the ops of the fake modalities 'infrared' and 'speech' for one test."""
  for op in (InfraredOp, SpeechOp):
    monkeypatch.setitem(ops.REGISTRY, op.name, op)


def make_batches(labels, captions=None, batch_size=4, caption_valid=None, items=None):
  """Example i: image and infrared whose element 0 is i, label[i], captions[i] (one token id
  per caption), and `items`: more modalities with an items axis, name -> (ids [N, K],
  valid [N, K]), each item a vector whose element 0 is its id (mask all False if not valid).

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
    infrared = np.zeros((batch_size, 3), np.float32)
    infrared[:, 0] = take
    ids = np.zeros((batch_size, k, MAX_LEN), np.int32)
    ids[:, :, 0] = captions[take]
    mask = np.zeros((batch_size, k, MAX_LEN), np.bool_)
    mask[:, :, 0] = caption_valid[take]
    label = labels[take].astype(np.int32)
    label[len(idx):] = label[len(idx):] + 1
    batch = dict(image=image, infrared=infrared, text=ids, text_mask=mask, label=label,
                 num_objects=np.ones(batch_size, np.int32),
                 _valid=np.arange(batch_size) < len(idx))
    for name, (item_ids, item_valid) in (items or {}).items():
      values = np.zeros((batch_size, item_ids.shape[1], 3), np.float32)
      values[:, :, 0] = item_ids[take]
      batch[name] = values
      batch[f'{name}_mask'] = np.repeat(item_valid[take][..., None], 3, axis=-1)
    batches.append(batch)
  return batches


@pytest.fixture
def data(monkeypatch):
  """Replaces mmfusion.data.evaluation.batches with a recording fake that yields
  `data.batches`, keeping only the entries of the inputs asked for (and of keep_if), as the
  real one does: an evaluator that reads an input it did not declare fails."""
  fake = types.SimpleNamespace(batches=[], calls=[])

  def batches(source, split, inputs, batch_size, keep_if=None):
    fake.calls.append(dict(source=source, split=split, inputs=tuple(inputs),
                           batch_size=batch_size, keep_if=keep_if))
    keep = {k for name in inputs for k in (name, f'{name}_mask')} | set(keep_if or ()) | {
        '_valid'}
    for batch in fake.batches:
      assert batch['_valid'].shape[0] == batch_size
      yield {k: v.copy() for k, v in batch.items() if k in keep}

  monkeypatch.setattr(evaluation, 'batches', batches)
  return fake


def make_config(num_classes=None, **heads):
  """The base config with the fakes' sizes; a classification head on the image when
  num_classes is given, `heads` more heads; towers also for the fake modalities."""
  config = config_lib.base()
  config.tokenizer.max_len = MAX_LEN
  config.data.image_size = IMAGE_SIZE
  config.model.towers.infrared = dict(type='fake')
  config.model.towers.speech = dict(type='fake')
  if num_classes is not None:
    config.model.heads.classification = dict(num_classes=num_classes, input='image')
  for name, options in heads.items():
    config.model.heads[name] = options
  return config


def run(evaluator, params):
  results = dict(evaluator.run(params))
  assert all(type(v) is float for v in results.values()), results
  return results


# ----------------------------------------------------------------------------- zeroshot


CLASSES = ['red circle', 'blue square', 'green triangle']
TEMPLATES = ('a {}.', 'a picture of a {}.')


def zeroshot_setup(data, labels, templates=TEMPLATES, classes=CLASSES, batch_size=4,
                   modality='image'):
  data.batches = make_batches(labels, batch_size=batch_size)
  prompts = [t.format(c) for t in templates for c in classes]   # not the evaluator's order
  tokenizer = FakeTokenizer(prompts)
  config = make_config()
  source = FakeSource(config, tokenizer, classes)
  evaluator = evals.build('zs', dict(type='zeroshot', every=10, split='test',
                                     batch_size=batch_size, keep_if={'num_objects': 1},
                                     templates=templates, modality=modality, prompts='text'),
                          model=TableModel(), config=config, source=source)
  return evaluator, tokenizer


def test_zeroshot_perfect_model_and_padding_ignored(data):
  labels = np.array([0, 1, 2, 2, 1, 0, 1])                         # 2 batches, 1 padding row
  evaluator, tokenizer = zeroshot_setup(data, labels)
  text_table = np.zeros((len(tokenizer.vocab), 3))
  for prompt, i in tokenizer.vocab.items():
    text_table[i, [c in prompt for c in CLASSES].index(True)] = 1.0
  results = run(evaluator, table_params(np.eye(3)[labels], text_table))
  assert results == {'accuracy': 1.0, 'macro_f1': 1.0, 'num_examples': 7.0}
  assert data.calls == [dict(source=evaluator.source, split='test', inputs=('image', 'label'),
                             batch_size=4, keep_if={'num_objects': 1})]


def test_zeroshot_averages_templates_and_renormalises(data):
  # Image of class 0 = e0. Class 0's prompts disagree (e0, e2): mean (e0+e2)/2, score 0.5,
  # 0.707 once renormalised. Class 1's prompts agree on 0.6 e0 + 0.8 e1: score 0.6.
  # Only the renormalised ensemble picks class 0.
  classes = ['red circle', 'blue square']
  evaluator, tokenizer = zeroshot_setup(data, np.array([0]), classes=classes)
  rows = {'a red circle.': [1, 0, 0], 'a picture of a red circle.': [0, 0, 1],
          'a blue square.': [0.6, 0.8, 0], 'a picture of a blue square.': [0.6, 0.8, 0]}
  text_table = np.array([rows[p] for p in sorted(tokenizer.vocab, key=tokenizer.vocab.get)])
  assert run(evaluator, table_params(np.eye(3)[[0]], text_table))['accuracy'] == 1.0


@pytest.mark.parametrize('modality', ['image', 'infrared'])
def test_zeroshot_matches_numpy_reference(data, modality):
  # Any modality can be classified against the text prompts: its own embeddings, its own
  # entries in the batches.
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, 23)
  evaluator, tokenizer = zeroshot_setup(data, labels, batch_size=5, modality=modality)
  table = rng.normal(size=(23, 4))
  text_table = rng.normal(size=(len(tokenizer.vocab), 4))
  text = normalize(text_table)
  classes = normalize(np.stack([
      np.mean([text[tokenizer.vocab[t.format(c)]] for t in TEMPLATES], axis=0)
      for c in CLASSES]))
  pred = np.argmax(normalize(table) @ classes.T, axis=1)
  # The other modality's table is upside down: read by mistake, it would change every answer.
  params = lambda text_table: table_params(
      table if modality == 'image' else -table, text_table,
      infrared=table if modality == 'infrared' else -table)
  results = run(evaluator, params(text_table))
  assert results['accuracy'] == pytest.approx(np.mean(pred == labels))
  assert results['macro_f1'] == pytest.approx(ref_macro_f1(pred, labels, 3))
  assert 0 < results['accuracy'] < 1                               # the case is informative
  assert data.calls[0]['inputs'] == (modality, 'label')
  # Same evaluator, other params: the second run recomputes the class embeddings.
  assert run(evaluator, params(-text_table))['accuracy'] != pytest.approx(results['accuracy'])


# ----------------------------------------------------------------------------- retrieval


def retrieval_evaluator(batch_size=4, pair=('image', 'text'), config=None, **options):
  config = config or make_config()
  return evals.build('ret', dict(type='retrieval', every=0, split='validation',
                                 batch_size=batch_size, keep_if={}, pair=pair, **options),
                     model=TableModel(), config=config, source=FakeSource(config))


def test_retrieval_perfect_model(data):
  n, k = 6, 2
  captions = np.arange(n * k).reshape(n, k)
  data.batches = make_batches(np.zeros(n, int), captions)
  text_table = np.eye(n)[np.arange(n * k) // k]                   # caption (i, j) -> e_i
  evaluator = retrieval_evaluator()
  results = run(evaluator, table_params(np.eye(n), text_table))
  assert results == {'i2t_r1': 1.0, 'i2t_r5': 1.0, 'i2t_r10': 1.0,
                     't2i_r1': 1.0, 't2i_r5': 1.0, 't2i_r10': 1.0,
                     'num_image': 6.0, 'num_text': 12.0}
  assert data.calls == [dict(source=evaluator.source, split='validation',
                             inputs=('image', 'text'), batch_size=4, keep_if=None)]


def test_retrieval_permuted_model_hand_computed(data):
  # 4 images (e_i), 2 captions each; images 0 and 1 have their captions swapped (both of
  # image 0's captions embed to e_1 and vice versa). Every score is exactly 0 or 1.
  n, k = 4, 2
  captions = np.arange(n * k).reshape(n, k)
  data.batches = make_batches(np.zeros(n, int), captions, batch_size=3)
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
                                   'num_image': 4.0, 'num_text': 8.0})


def brute_force_recall(queries, query_owner, candidates, candidate_owner, ks=(1, 5, 10)):
  """Recall@k by sorting every query's scores: the rank of the first candidate of the
  query's own example (no ties: random embeddings)."""
  first = [np.flatnonzero(candidate_owner[np.argsort(-(candidates @ q))] == o)[0]
           for q, o in zip(queries, query_owner)]
  return {k: float(np.mean(np.array(first) < k)) for k in ks}


def test_retrieval_matches_argsort_reference_and_skips_padding_captions(data):
  rng = np.random.default_rng(4)
  n, k, dim = 14, 3, 6
  captions = np.arange(n * k).reshape(n, k)
  caption_valid = np.ones((n, k), bool)
  caption_valid[[2, 9], 2] = False                                 # images with 2 captions
  data.batches = make_batches(np.zeros(n, int), captions, batch_size=4,
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
  assert results['num_image'] == 14.0 and results['num_text'] == 40.0
  assert 0 < results['i2t_r1'] < 1 and 0 < results['t2i_r1'] < 1  # the case is informative


def test_retrieval_between_two_modalities_without_items(data, modalities):
  # image <-> infrared: one item per example on both sides. Their initials are the same, so
  # the metrics take the whole names.
  rng = np.random.default_rng(6)
  n, dim = 13, 5
  data.batches = make_batches(np.zeros(n, int), batch_size=4)
  image_table = rng.normal(size=(n, dim))
  infrared_table = image_table + 1.0 * rng.normal(size=(n, dim))
  evaluator = retrieval_evaluator(pair=('image', 'infrared'))
  results = run(evaluator, table_params(image_table, infrared=infrared_table))
  assert data.calls[0]['inputs'] == ('image', 'infrared')
  owner = np.arange(n)
  image, infrared = normalize(image_table), normalize(infrared_table)
  expected = {'num_image': 13.0, 'num_infrared': 13.0}
  for x, y, (zx, zy) in (('image', 'infrared', (image, infrared)),
                         ('infrared', 'image', (infrared, image))):
    recall = brute_force_recall(zx, owner, zy, owner)
    expected.update({f'{x}2{y}_r{k}': r for k, r in recall.items()})
  assert results == pytest.approx(expected)
  assert 0 < results['image2infrared_r1'] < 1 and 0 < results['infrared2image_r1'] < 1


def test_retrieval_between_two_modalities_with_items(data, modalities):
  # speech <-> text: several items per example on both sides, some of them padding. A query
  # hits at k when any item of its own example is in the top k.
  rng = np.random.default_rng(7)
  n, k_text, k_speech, dim = 11, 3, 2, 6
  captions = np.arange(n * k_text).reshape(n, k_text)
  caption_valid = np.ones((n, k_text), bool)
  caption_valid[[1, 6], 2] = False
  speech_ids = np.arange(n * k_speech).reshape(n, k_speech)
  speech_valid = np.ones((n, k_speech), bool)
  speech_valid[[0, 6, 7], 1] = False
  data.batches = make_batches(np.zeros(n, int), captions, batch_size=4,
                              caption_valid=caption_valid,
                              items={'speech': (speech_ids, speech_valid)})
  centres = rng.normal(size=(n, dim))
  text_table = centres[np.arange(n * k_text) // k_text] + 1.2 * rng.normal(size=(n * k_text, dim))
  speech_table = centres[np.arange(n * k_speech) // k_speech] + 1.2 * rng.normal(
      size=(n * k_speech, dim))
  evaluator = retrieval_evaluator(pair=('speech', 'text'))
  results = run(evaluator, table_params(np.eye(dim), text_table, speech=speech_table))
  assert data.calls[0]['inputs'] == ('speech', 'text')

  speech = normalize(speech_table)[speech_ids[speech_valid]]
  text = normalize(text_table)[captions[caption_valid]]
  speech_owner, text_owner = np.nonzero(speech_valid)[0], np.nonzero(caption_valid)[0]
  expected = {'num_speech': float(speech_valid.sum()), 'num_text': float(caption_valid.sum())}
  expected.update({f's2t_r{k}': r for k, r in brute_force_recall(
      speech, speech_owner, text, text_owner).items()})
  expected.update({f't2s_r{k}': r for k, r in brute_force_recall(
      text, text_owner, speech, speech_owner).items()})
  assert results == pytest.approx(expected)
  assert 0 < results['s2t_r1'] < 1 and 0 < results['t2s_r1'] < 1  # the case is informative


def brute_force_reranked_recall(queries, query_owner, candidates, candidate_owner, match, k,
                                scale, ks=(1, 5, 10)):
  """Recall@ks when each query's top k candidates by cosine are re-ordered by
  match(query index, candidate index) (+ scale * cosine) and put above all the others, which
  keep their cosine order."""
  first = []
  for qi, (q, o) in enumerate(zip(queries, query_owner)):
    sim = candidates @ q
    order = np.argsort(-sim)
    top, rest = order[:k], order[k:]
    score = np.array([match(qi, c) for c in top]) + scale * sim[top]
    ranking = np.concatenate([top[np.argsort(-score)], rest])
    first.append(np.flatnonzero(candidate_owner[ranking] == o)[0])
  return {kk: float(np.mean(np.array(first) < kk)) for kk in ks}


@pytest.mark.parametrize('rerank_score', ['itm', 'itm+contrastive'])
def test_retrieval_rerank_matches_brute_force(data, rerank_score):
  # The ITM head is a bilinear form (image row @ W) . text row, not symmetric: a direction
  # that passed the image and the text the wrong way round would score other pairs.
  rng = np.random.default_rng(8)
  n, k, dim, rerank_k = 9, 2, 5, 4
  captions = np.arange(n * k).reshape(n, k)
  caption_valid = np.ones((n, k), bool)
  caption_valid[3, 1] = False
  data.batches = make_batches(np.zeros(n, int), captions, batch_size=4,
                              caption_valid=caption_valid)
  image_table = rng.normal(size=(n, dim))
  text_table = image_table[np.arange(n * k) // k] + 1.5 * rng.normal(size=(n * k, dim))
  w = rng.normal(size=(dim, dim))
  config = make_config(itm=dict(pair=('image', 'text')))
  evaluator = retrieval_evaluator(config=config, rerank_k=rerank_k, rerank_score=rerank_score)
  results = run(evaluator, table_params(image_table, text_table, itm=w))

  image_rows, text_rows = image_table, text_table[captions[caption_valid]]
  image, text = normalize(image_rows), normalize(text_rows)
  image_owner, text_owner = np.arange(n), np.nonzero(caption_valid)[0]
  itm = lambda i, t: (image_rows[i] @ w) @ text_rows[t]
  scale = 10.0 if rerank_score == 'itm+contrastive' else 0.0
  recalls = {
      'i2t': brute_force_recall(image, image_owner, text, text_owner),
      't2i': brute_force_recall(text, text_owner, image, image_owner),
      'i2t_rerank': brute_force_reranked_recall(image, image_owner, text, text_owner, itm,
                                                rerank_k, scale),
      't2i_rerank': brute_force_reranked_recall(text, text_owner, image, image_owner,
                                                lambda t, i: itm(i, t), rerank_k, scale),
  }
  expected = {f'{name}_r{kk}': r for name, recall in recalls.items() for kk, r in recall.items()}
  expected.update(num_image=float(n), num_text=float(caption_valid.sum()))
  assert results == pytest.approx(expected)
  # The case is informative: re-ranking changes the recall at 1 in both directions.
  assert results['i2t_rerank_r1'] != pytest.approx(results['i2t_r1'])
  assert results['t2i_rerank_r1'] != pytest.approx(results['t2i_r1'])


def test_retrieval_direction_names():
  assert retrieval.direction('image', 'text') == 'i2t'
  assert retrieval.direction('text', 'audio') == 't2a'
  assert retrieval.direction('sensor', 'speech') == 'sensor2speech'


def test_retrieval_rejects_image_without_captions(data):
  caption_valid = np.array([[True], [False]])
  data.batches = make_batches(np.zeros(2, int), np.array([[0], [1]]),
                              caption_valid=caption_valid)
  with pytest.raises(ValueError, match=r'config.evals.ret: 1 examples .* have no text item'):
    run(retrieval_evaluator(), table_params(np.eye(2), np.eye(2)))


# ----------------------------------------------------------------------------- classification


def classification_evaluator(num_classes, names=(), classify='image'):
  config = make_config(num_classes)
  config.model.heads.classification.input = classify
  return evals.build('cls', dict(type='classification', every=5, split='test', batch_size=4),
                     model=TableModel(classify=classify), config=config,
                     source=FakeSource(config, names=names))


def test_classification_perfect_head_and_padding_ignored(data):
  labels = np.array([0, 1, 2, 3, 1, 2])
  data.batches = make_batches(labels)
  results = run(classification_evaluator(4), table_params(np.eye(4)[labels], head=np.eye(4)))
  assert results == {'accuracy': 1.0, 'macro_f1': 1.0, 'num_examples': 6.0}
  assert data.calls[0]['inputs'] == ('image', 'label')


@pytest.mark.parametrize('modality', ['image', 'infrared'])
def test_classification_matches_numpy_reference(data, modality):
  # The head reads the modality config.model.heads.classification.input names.
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, 19)
  data.batches = make_batches(labels)
  table, head = rng.normal(size=(19, 5)), rng.normal(size=(5, 4))
  pred = np.argmax(normalize(table) @ head, axis=1)
  params = table_params(table if modality == 'image' else -table, head=head,
                        infrared=table if modality == 'infrared' else -table)
  results = run(classification_evaluator(4, classify=modality), params)
  assert results['accuracy'] == pytest.approx(np.mean(pred == labels))
  assert results['macro_f1'] == pytest.approx(ref_macro_f1(pred, labels, 4))
  assert data.calls[0]['inputs'] == (modality, 'label')


def test_classification_head_sized_from_the_dataset(data):
  # num_classes=-1 ("as many as the dataset's labels") is resolved from class_names at run.
  data.batches = make_batches(np.array([0, 1, 2]))
  evaluator = classification_evaluator(-1, names=['a', 'b', 'c'])
  results = run(evaluator, table_params(np.eye(3), head=np.eye(3)))
  assert results['accuracy'] == 1.0 and evaluator.num_classes == 3


def test_classification_rejects_logits_of_the_wrong_width(data):
  data.batches = make_batches(np.array([0, 1]))
  with pytest.raises(ValueError, match=r'logits have shape .* expected \[batch, 4\]'):
    run(classification_evaluator(4), table_params(np.eye(3)[:2], head=np.eye(3)))


# ----------------------------------------------------------------------------- build


ZS = dict(type='zeroshot', every=1, modality='image', prompts='text')
RET = dict(type='retrieval', every=1, pair=('image', 'text'))


@pytest.mark.parametrize('entry, heads, match', [
    (dict(type='zero_shot', every=1), {},
     r"config.evals.bad: unknown type 'zero_shot'; known types: captioning, classification, "
     'retrieval, robustness, vqa, zeroshot'),
    (dict(every=1), {}, r'config.evals.bad has no "type"'),
    (dict(RET, templates=('a {}.',)), {},
     r"config.evals.bad: unknown key\(s\) \['templates'\] for type 'retrieval'"),
    (dict(ZS, batchsize=8), {}, r"unknown key\(s\) \['batchsize'\]"),
    (dict(ZS, every=-1), {}, 'config.evals.bad: every must be'),
    (dict(ZS, batch_size=0), {}, 'config.evals.bad: batch_size must be'),
    (dict(ZS, templates='a {}.'), {}, 'templates must be a non-empty'),
    (dict(ZS, templates=('a photo',)), {}, "exactly one '{}'"),
    (dict(ZS, keep_if=1), {}, 'keep_if must be a dict'),
    (dict(RET, split=''), {}, 'split must be'),
    (dict(type='classification', every=1), {}, 'needs a classification head'),
    # The modalities are the config's to name: required, and each must have a tower.
    (dict(type='zeroshot', every=1), {},
     r"config.evals.bad: type 'zeroshot' needs \['modality', 'prompts'\]"),
    (dict(type='retrieval', every=1), {}, r'give either pair=\(a, b\) or pairs='),
    (dict(RET, pairs=(('image', 'text'),)), {}, r'give either pair=\(a, b\) or pairs='),
    (dict(type='retrieval', every=1, pairs=(('image', 'text'), ('image', 'audio'))), {},
     r"config.evals.bad.pairs = 'audio': no such tower"),
    (dict(type='retrieval', every=1, pairs=(('image', 'text'), ('text', 'text'))), {},
     'needs two different modalities'),
    (dict(type='retrieval', every=1, pairs=(('image', 'text'), ('text', 'image')), rerank_k=2),
     dict(itm=dict(pair=('image', 'text'))), 're-ranks one pair'),
    (dict(ZS, modality='audio'), {},
     r"config.evals.bad.modality = 'audio': no such tower in config.model.towers"),
    (dict(ZS, prompts='audio'), {}, r"config.evals.bad.prompts = 'audio': no such tower"),
    (dict(RET, pair=('image', 'audio')), {}, r"config.evals.bad.pair = 'audio': no such tower"),
    (dict(RET, pair=('image', 'image')), {}, 'needs two different modalities'),
    (dict(RET, pair=('image', 'text', 'infrared')), {}, 'needs two different modalities'),
    (dict(RET, pair='it'), {}, 'needs two different modalities'),
    # Re-ranking needs an ITM head on the same pair.
    (dict(RET, rerank_k=5), {}, 'no itm head on pair'),
    (dict(RET, pair=('image', 'infrared'), rerank_k=5), dict(itm=dict(pair=('image', 'text'))),
     'no itm head on pair'),
    (dict(RET, rerank_k=-1), dict(itm=dict(pair=('image', 'text'))), 'rerank_k must be'),
    (dict(RET, rerank_k=2, rerank_score='itm*2'), dict(itm=dict(pair=('image', 'text'))),
     'rerank_score must be one of'),
    (dict(type='vqa', every=1), {}, 'needs a VQA head'),
    (dict(type='captioning', every=1), {}, 'needs a caption head'),
])
def test_build_rejects_bad_entries_before_any_compute(data, entry, heads, match):
  config = make_config(**heads)
  # evals.check (config validation, before anything is built) and build fail alike.
  with pytest.raises(ValueError, match=match):
    evals.check('bad', entry, config)
  with pytest.raises(ValueError, match=match):
    evals.build('bad', entry, model=TableModel(), config=config, source=FakeSource(config))
  assert data.calls == []


def test_build_accepts_the_base_config_entries(data):
  config = make_config()
  built = {}
  for name in config.evals:
    evals.check(name, config.evals[name], config)
    built[name] = evals.build(name, config.evals[name], model=TableModel(), config=config,
                              source=FakeSource(config))
  for name, evaluator in built.items():
    assert isinstance(evaluator, evals.REGISTRY[config.evals[name].type])
  assert built['zeroshot'].keep_if == {'num_objects': 1}
  assert built['zeroshot'].templates == config.evals.zeroshot.templates
  assert built['zeroshot'].inputs() == ('image', 'label')
  assert built['retrieval'].keep_if is None             # keep_if={} means keep everything
  assert built['retrieval'].inputs() == ('image', 'text')
  assert data.calls == []


def test_empty_split_is_an_error(data):
  data.batches = []
  with pytest.raises(ValueError, match="config.evals.cls: split 'test' gave no examples"):
    run(classification_evaluator(2), table_params(np.eye(2), head=np.eye(2)))


def test_importing_and_building_evals_does_not_import_the_data_side():
  # The data side pulls in TensorFlow: neither importing mmfusion.evals nor building the
  # evaluators (config validation does, in every process) should pay for it.
  code = '\n'.join([
      'import sys, mmfusion.evals',
      'from mmfusion import config as config_lib',
      'config = config_lib.base()',
      'for name in config.evals:',
      '  mmfusion.evals.build(name, config.evals[name], model=None, config=config, source=None)',
      'loaded = sorted(m for m in ("tensorflow", "mmfusion.data.evaluation", "mmfusion.data.ops")',
      '                if m in sys.modules)',
      'assert not loaded, f"imported eagerly: {loaded}"',
  ])
  subprocess.run([sys.executable, '-c', code], check=True)
