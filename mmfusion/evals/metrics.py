"""Evaluation metrics as pure numpy functions: retrieval recall@k, accuracy, macro-F1, confusion.

No JAX here: evaluators gather embeddings or predictions to the host and score them with these.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_hits(sim: np.ndarray, positive: np.ndarray, ks: Sequence[int]) -> np.ndarray:
  """Per-query probability that a positive is among the top k, ties broken at random.

  A query is a hit at k when any of its positives ranks within the top k candidates. Exact
  score ties are resolved as a uniformly random order would resolve them, and the expected
  hit is returned in closed form (deterministic, no sampling): a collapsed model whose
  scores are all equal gets chance level, never accidental credit (an "any tie counts as a
  win" rank would give it R@1 = 1), and identical candidates (the same caption text under
  two images) share the credit instead of both winning or both losing.

  For one query, let g be the negatives scoring strictly above the best positive, t the
  negatives tied with it and s >= 1 the positives tied with it. The tie group fills ranks
  g .. g+s+t-1 in random order, so the query misses at k iff the first k-g members of that
  group are all negatives: P(miss) = prod_{j < k-g} (t-j) / (s+t-j) (0 once j reaches t).

  Args:
    sim: [Nq, Nc] scores, higher is better; must be finite.
    positive: [Nq, Nc] bool; every query needs at least one positive.
    ks: the cut-offs, positive ints.

  Returns:
    [len(ks), Nq] float64 hit probabilities in [0, 1] (exactly 0 or 1 without ties).
  """
  sim = np.asarray(sim)
  positive = np.asarray(positive)
  if sim.ndim != 2 or sim.shape != positive.shape:
    raise ValueError(f'sim {sim.shape} and positive {positive.shape} must both be [Nq, Nc].')
  if positive.dtype != np.bool_:
    raise ValueError(f'positive must be bool, got {positive.dtype}.')
  ks = [_check_k(k) for k in ks]
  if not np.all(np.isfinite(sim)):
    # NaN compares false against everything, which would silently rank a positive first.
    raise ValueError(f'sim has {np.sum(~np.isfinite(sim))} non-finite scores (NaN/inf).')
  without = np.flatnonzero(~positive.any(axis=1))
  if without.size:
    raise ValueError(f'{without.size} queries have no positive candidate '
                     f'(first: query {without[0]}); recall is undefined for them.')

  best = np.max(np.where(positive, sim, -np.inf), axis=1, keepdims=True)
  negative = ~positive
  above = np.sum(negative & (sim > best), axis=1)        # g
  tied_neg = np.sum(negative & (sim == best), axis=1)    # t
  tied_pos = np.sum(positive & (sim == best), axis=1)    # s >= 1

  hits = np.zeros((len(ks), sim.shape[0]), np.float64)
  for i, k in enumerate(ks):
    slots = k - above          # top-k places left for the tie group
    miss = np.ones(sim.shape[0], np.float64)
    for j in range(max(int(slots.max()), 0)):
      # Once j >= t the numerator is 0 and miss stays 0; the max() only avoids 0/0.
      factor = np.maximum(tied_neg - j, 0) / np.maximum(tied_pos + tied_neg - j, 1)
      miss = np.where(j < slots, miss * factor, miss)
    hits[i] = np.where(slots > 0, 1.0 - miss, 0.0)
  return hits


def recall_at_k(sim: np.ndarray, positive: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """Fraction of queries with a positive in the top k, for each k (see `retrieval_hits`)."""
  hits = retrieval_hits(sim, positive, ks)
  return {int(k): float(h.mean()) for k, h in zip(ks, hits)}


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
  """Fraction of rows where pred == label."""
  pred, label = _check_pred_label(pred, label)
  return float(np.mean(pred == label))


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
  """[C, C] int64 counts; row = true label, column = prediction (sklearn's convention)."""
  pred, label = _check_pred_label(pred, label, num_classes)
  flat = np.bincount(label.astype(np.int64) * num_classes + pred, minlength=num_classes ** 2)
  return flat.reshape(num_classes, num_classes)


def macro_f1(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
  """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN).

  Classes that are neither predicted nor present in `label` are left out of the mean: on an
  eval subset that holds only some classes (e.g. filtered by keep_if) they carry no
  information, and counting them as 0 or 1 would move the score for no reason. A class that
  is predicted but never labelled (or the reverse) counts, with F1 = 0.
  """
  cm = confusion_matrix(pred, label, num_classes)
  tp = np.diag(cm).astype(np.float64)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  present = (tp + fp + fn) > 0
  f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
  return float(f1.mean())


def _check_k(k: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'recall cut-offs must be positive ints, got {k!r}.')
  return int(k)


def _check_pred_label(pred: np.ndarray, label: np.ndarray,
                      num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.ndim != 1 or pred.shape != label.shape:
    raise ValueError(f'pred {pred.shape} and label {label.shape} must both be [N].')
  if pred.size == 0:
    raise ValueError('no examples to score (pred and label are empty).')
  for what, x in (('pred', pred), ('label', label)):
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f'{what} must hold integer class ids, got {x.dtype}.')
    if num_classes is not None and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f'{what} has class ids in [{x.min()}, {x.max()}], outside '
                       f'[0, {num_classes}).')
  return pred.astype(np.int64), label.astype(np.int64)


def bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         max_n: int = 4) -> float:
  """Corpus BLEU-`max_n` (Papineni et al. 2002) of tokenised hypotheses, each against its list
  of tokenised references: clipped n-gram precisions summed over the corpus, their geometric
  mean (uniform weights), times the brevity penalty with the closest reference length.
  No smoothing: a corpus with no matching n-gram of some order scores 0, as in the standard.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} reference lists.')
  if not hypotheses:
    raise ValueError('bleu of an empty corpus.')
  matches, totals = np.zeros(max_n), np.zeros(max_n)
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    if not refs:
      raise ValueError('every hypothesis needs at least one reference.')
    hyp_len += len(hyp)
    # Closest reference length; the shorter one on a tie (as sacrebleu / multi-bleu).
    ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    for n in range(1, max_n + 1):
      counts = _ngrams(hyp, n)
      max_ref = {}
      for ref in refs:
        for gram, c in _ngrams(ref, n).items():
          max_ref[gram] = max(max_ref.get(gram, 0), c)
      matches[n - 1] += sum(min(c, max_ref.get(gram, 0)) for gram, c in counts.items())
      totals[n - 1] += max(len(hyp) - n + 1, 0)
  if np.any(matches == 0):
    return 0.0
  log_precision = np.mean(np.log(matches / totals))
  brevity = 1.0 if hyp_len > ref_len else float(np.exp(1 - ref_len / max(hyp_len, 1)))
  return float(brevity * np.exp(log_precision))


def _ngrams(tokens: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
  counts: dict[tuple[str, ...], int] = {}
  for i in range(len(tokens) - n + 1):
    gram = tuple(tokens[i:i + n])
    counts[gram] = counts.get(gram, 0) + 1
  return counts
