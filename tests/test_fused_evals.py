"""BLEU and caption attribute scoring against hand computations, the ITM re-ranking of
retrieval against a brute-force reference, and the VQA evaluator end to end with a table-lookup
model against a numpy reference."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmfusion import config as config_lib
from mmfusion import evals
from mmfusion.data import evaluation
from mmfusion.data import sources
from mmfusion.evals import captioning
from mmfusion.evals import metrics
from mmfusion.evals import retrieval
from mmfusion.evals import vqa
from mmfusion.models import towers


def test_bleu_hand_case():
  hyp = 'the red circle is on the left'.split()
  refs = ['a red circle on the left'.split(), 'the red circle is left'.split()]
  # Clipped n-gram matches / totals (n = 1..4), counted by hand:
  #   1: 'the' twice but at most once in a reference -> 1; red circle is on left -> 6 / 7
  #   2: the-red, red-circle, circle-is, on-the, the-left (not is-on) -> 5 / 6
  #   3: the-red-circle, red-circle-is, on-the-left -> 3 / 5
  #   4: the-red-circle-is -> 1 / 4
  # hyp length 7; closest reference length: 6 (|7-6| = 1 for the first, |7-5| = 2) -> no penalty.
  expected = np.exp(np.mean(np.log([6 / 7, 5 / 6, 3 / 5, 1 / 4])))
  assert metrics.bleu([hyp], [refs]) == pytest.approx(expected)


def test_bleu_brevity_penalty_and_perfect_match():
  ref = 'a small red circle on the left'.split()
  assert metrics.bleu([ref], [[ref]]) == pytest.approx(1.0)
  short = 'a small red circle'.split()
  # All n-grams match; hypothesis 4 words, reference 7: BP = exp(1 - 7/4).
  assert metrics.bleu([short], [[ref]]) == pytest.approx(np.exp(1 - 7 / 4))
  assert metrics.bleu([['blue', 'square']], [[ref]]) == 0.0
  with pytest.raises(ValueError, match='2 hypotheses but 1'):
    metrics.bleu([short, short], [[ref]])


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
  a, b = 'a red circle'.split(), 'a blue square on the right'.split()
  corpus = metrics.bleu([a, b], [[a], [b]])
  assert corpus == pytest.approx(1.0)
  # One wrong word in the long caption: corpus precision pools the counts of both.
  b_wrong = 'a blue square on the left'.split()
  got = metrics.bleu([a, b_wrong], [[a], [b]])
  p = [(3 + 5) / 9, (2 + 4) / 7, (1 + 3) / 5, (0 + 2) / 3]
  assert got == pytest.approx(np.exp(np.mean(np.log(p))))


def test_attribute_scores_hand_case():
  names = {'colour': ['red', 'blue', 'green'], 'shape': ['circle', 'square'],
           'size': ['small', 'large']}
  rows = {
      'object_colour': np.array([[0, -1], [1, 2], [0, -1], [2, -1]]),
      'object_shape': np.array([[0, -1], [1, 0], [1, -1], [0, -1]]),
      'object_size': np.array([[0, -1], [1, 1], [0, -1], [1, -1]]),
  }
  hypotheses = [
      'a small red circle'.split(),                  # all true
      'a large blue square and a green circle'.split(),   # all true, two objects
      'a red circle'.split(),                        # circle is wrong (the square is red)
      'a large green shape'.split(),                 # no shape word: incomplete
  ]
  scores = captioning.attribute_scores(hypotheses, rows, names)
  assert scores['attribute_accuracy'] == pytest.approx(2 / 4)
  assert scores['colour_accuracy'] == pytest.approx(4 / 4)
  assert scores['shape_accuracy'] == pytest.approx(2 / 3)
  assert scores['size_accuracy'] == pytest.approx(3 / 3)


def test_rerank_reorders_only_the_top_k_and_keeps_the_rest_below():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(6, 4))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  cands = rng.normal(size=(9, 4))
  cands /= np.linalg.norm(cands, axis=1, keepdims=True)
  positive = lambda q: np.eye(9, dtype=bool)[q % 9]
  oracle = lambda q, c: np.where(c == q % 9, 10.0, -10.0)   # an ITM head that knows the answer
  k = 3
  got = retrieval._recall_blocks(queries, cands, positive, rerank=(k, oracle))
  sim = queries @ cands.T
  in_top_k = np.array([i % 9 in np.argsort(-sim[i])[:k] for i in range(6)])
  # With an oracle, R@1 after re-ranking = the share of queries whose positive is in the top k.
  assert got[0] == pytest.approx(in_top_k.mean())
  plain = retrieval._recall_blocks(queries, cands, positive)
  assert got[0] >= plain[0]
  # A head with one score for everything shuffles the top k among themselves and keeps
  # the rest in contrastive order below them: recall at 5 and 10 (> k) is unchanged.
  constant = retrieval._recall_blocks(queries, cands, positive,
                                      rerank=(k, lambda q, c: np.zeros(len(q))))
  assert constant[1:] == pytest.approx(plain[1:])


def test_vqa_majority_baseline_hand_case():
  answers = np.array([[0, 3], [0, 2], [1, 2], [0, -1]])
  # Slot 0: answer 0 three times of 4; slot 1: answer 2 twice (the -1 is never right).
  assert vqa.majority_baseline(answers) == (3 + 2) / 8
  assert vqa.majority_baseline(np.full((2, 1), -1)) == 0.0


# -- the evaluators of the fused heads, with fakes ---------------------------------------------

IMAGE_SIZE = 2


class FakeSource:
  """What the VQA and captioning evaluators read of a data.sources.Source."""
  where = 'fake'

  def __init__(self, config, features=None):
    self.config = config
    self.features = dict(features or {})

  op = sources.Source.op       # the real lookup: builds and checks the op against `features`


class AnswerModel(nn.Module):
  """VQA by table lookup: the context's tower reads the example id (pixel 0 of the image),
  the question's tower its first token id t; the VQA logits of the pair are answer_table[i, t].
  """

  def encode(self, modality, inputs, mask=None, train=False):
    assert not train, 'evaluators must run the model in inference mode'
    if modality == 'image':
      ids, mask = inputs[:, 0, 0, 0], jnp.ones((inputs.shape[0], 1), jnp.bool_)
    else:
      ids, mask = inputs[:, 0], mask[:, :1]
    tokens = ids.astype(jnp.float32)[:, None, None]
    return towers.Encoded(tokens=tokens, mask=mask, pooled=tokens[:, 0], embedding=None)

  def fused_logits(self, head, encoded):
    assert head == 'vqa' and sorted(encoded) == ['image', 'text'], (head, sorted(encoded))
    image, text = encoded['image'], encoded['text']
    assert image.tokens.shape[0] == text.tokens.shape[0]   # one context per question
    i = image.pooled[:, 0].astype(jnp.int32)
    t = text.pooled[:, 0].astype(jnp.int32)
    return self.get_variable('params', 'answer_table')[i, t]


@pytest.fixture
def eval_batches(monkeypatch):
  """Fake evaluation.batches: yields the listed batches, records what it was asked for."""
  calls, listed = [], []

  def batches(source, split, inputs, batch_size, keep_if=None):
    calls.append(dict(split=split, inputs=tuple(inputs), batch_size=batch_size, keep_if=keep_if))
    for batch in listed:
      assert batch['_valid'].shape[0] == batch_size
      yield {k: v.copy() for k, v in batch.items()}

  monkeypatch.setattr(evaluation, 'batches', batches)
  return listed, calls


def vqa_batches(question_ids, answers, batch_size):
  """Example i: image whose pixel 0 is i; its Q questions are one token each; padding rows are
  copies of example 0 with other answers, marked _valid False."""
  n, q = answers.shape
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    take = np.concatenate([idx, np.zeros(batch_size - len(idx), int)])
    image = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    image[:, 0, 0, 0] = take
    question = np.zeros((batch_size, q, 4), np.int32)
    question[:, :, 0] = question_ids[take]
    mask = np.zeros((batch_size, q, 4), np.bool_)
    mask[:, :, :2] = True
    answer = answers[take].astype(np.int32)
    answer[len(idx):] = (answer[len(idx):] + 1) % 4
    out.append(dict(image=image, question=question, question_mask=mask, answer=answer,
                    _valid=np.arange(batch_size) < len(idx)))
  return out


def test_vqa_evaluator_matches_numpy_reference(eval_batches):
  listed, calls = eval_batches
  rng = np.random.default_rng(1)
  n, q, vocab, num_answers = 7, 3, 5, 4
  question_ids = rng.integers(0, vocab, (n, q))
  table = rng.normal(size=(n, vocab, num_answers))
  pred = table[np.arange(n)[:, None], question_ids].argmax(-1)          # [n, q]
  answers = rng.integers(0, num_answers, (n, q))
  right = rng.random((n, q)) < 0.5
  answers[right] = pred[right]
  answers[rng.random((n, q)) < 0.2] = -1                                # outside the vocabulary
  listed.extend(vqa_batches(question_ids, answers, batch_size=3))
  config = config_lib.base()
  config.model.heads.vqa = dict(answers=num_answers, question='text', context='image')
  evaluator = evals.build('vqa', dict(type='vqa', every=1, split='test', batch_size=3),
                          model=AnswerModel(), config=config, source=FakeSource(config))
  results = dict(evaluator.run({'answer_table': jnp.asarray(table, jnp.float32)}))
  assert calls == [dict(split='test', inputs=('image', 'question'), batch_size=3, keep_if=None)]

  correct = (pred == answers) & (answers >= 0)
  # The blind answerer: per question slot, the count of its most frequent known answer.
  blind = sum(max([np.sum(answers[:, j] == a) for a in range(num_answers)]) for j in range(q))
  expected = {'accuracy': correct.mean(), 'majority_baseline': blind / (n * q),
              'unknown_answers': np.mean(answers < 0), 'num_questions': float(n * q)}
  expected.update({f'accuracy_q{j}': correct[:, j].mean() for j in range(q)})
  assert results == pytest.approx(expected)
  assert 0 < results['accuracy'] < 1 and 0 < results['unknown_answers'] < 1


def test_fused_evaluators_read_the_modalities_of_their_heads():
  config = config_lib.base()
  config.model.towers.depth = dict(type='fake')
  config.model.heads.vqa = dict(answers=3, question='text', context='depth')
  config.model.heads.caption = dict(target='text', context='depth')
  built = lambda kind, source: evals.build(kind, dict(type=kind, every=1), model=None,
                                           config=config, source=source)
  assert built('vqa', FakeSource(config)).inputs() == ('depth', 'question')
  # Captioning asks for the objects (its attribute scores) only where the dataset has them.
  assert built('captioning', FakeSource(config)).inputs() == ('depth', 'text')
  assert built('captioning', FakeSource(config)).attribute_names() == {}
  objects = tfds.features.Sequence({'colour': tfds.features.ClassLabel(names=['red', 'blue']),
                                    'shape': tfds.features.ClassLabel(names=['circle']),
                                    'weight': tfds.features.Scalar(np.float32)})
  with_objects = built('captioning', FakeSource(config, {'objects': objects}))
  assert with_objects.inputs() == ('depth', 'text', 'objects')
  assert with_objects.attribute_names() == {'colour': ['red', 'blue'], 'shape': ['circle']}
