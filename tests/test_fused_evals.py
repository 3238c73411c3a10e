"""BLEU and caption attribute scoring against hand computations, and the ITM re-ranking of
retrieval against a brute-force reference."""
import numpy as np
import pytest

from mmfusion.evals import captioning
from mmfusion.evals import metrics
from mmfusion.evals import retrieval
from mmfusion.evals import vqa


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
