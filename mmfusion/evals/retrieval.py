"""Retrieval recall@k between any two modalities, COCO-style: every example with all its items.

A modality whose evaluation entry has an items axis (text: K captions per image) contributes
every real item; one without (image) contributes one per example. For a pair (a, b):
a->b: each a item is a query; it hits at k if ANY item of its own example ranks in the top k
of all b items. b->a: the same the other way round.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmfusion import sharding
from mmfusion.evals import common
from mmfusion.evals import metrics
from mmfusion.models import towers

KS = (1, 5, 10)
# Rows of the [queries, candidates] score matrix scored at once: bounds host memory to
# ~16 MiB of float32 (plus masks) whatever the split size, instead of N x N*K at once.
_SCORE_BLOCK_ELEMENTS = 1 << 22


def direction(a: str, b: str) -> str:
  """Metric prefix of a->b retrieval: 'i2t' for image->text; whole names ('sensor2speech')
  when the initials would not tell the modalities apart."""
  return f'{a[0]}2{b[0]}' if a[0] != b[0] else f'{a}2{b}'


class Retrieval(common.Evaluator):
  """Yields <a>2<b>_r{1,5,10} and <b>2<a>_r{1,5,10} (fractions, e.g. i2t_r1 and t2i_r1 for
  pair=('image', 'text')), num_<a> and num_<b> (items scored). `pairs` instead of `pair`
  scores several pairs from one pass over the split (each modality embedded once), e.g.
  pairs=(('image', 'text'), ('image', 'audio'), ('text', 'audio')) -> i2t, t2i, i2a, a2i, t2a
  and a2t.

  rerank_k > 0 (needs the model's ITM head on the same pair): each query's top rerank_k
  candidates by the contrastive score are re-ordered, and the recalls of that ranking are
  yielded too, as <a>2<b>_rerank_r{1,5,10} and <b>2<a>_rerank_r{1,5,10}. rerank_score says by
  what: 'itm', the ITM head's match-minus-no-match logit alone (ALBEF), or 'itm+contrastive'
  (default), that plus the contrastive logit (logit_scale x cosine), as BLIP adds the
  similarity to the ITM score: both are log-odds, and the sum keeps what each knows.

  Items whose mask is all False are padding (an image with fewer than K captions) and take part
  neither as queries nor as candidates. Score ties are broken at random in expectation
  (`metrics.retrieval_hits`), so identical caption texts under different images share credit
  rather than each getting it.
  """
  TYPE = 'retrieval'
  OPTIONS = {**common.Evaluator.OPTIONS, 'pair': (), 'pairs': (), 'rerank_k': 0,
             'rerank_score': 'itm+contrastive'}
  RERANK_SCORES = ('itm', 'itm+contrastive')

  @classmethod
  def check_options(cls, name, options, config):
    options = super().check_options(name, options, config)
    if bool(options['pair']) == bool(options['pairs']):
      raise ValueError(f'config.evals.{name}: give either pair=(a, b) or pairs=((a, b), ...); '
                       f"got pair={options['pair']!r}, pairs={options['pairs']!r}.")
    key = 'pair' if options['pair'] else 'pairs'
    given = (options['pair'],) if options['pair'] else options['pairs']
    pairs = []
    for pair in given:
      if not isinstance(pair, (tuple, list)) or len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f'config.evals.{name}.{key}: {pair!r} needs two different modalities.')
      pairs.append(tuple(cls.check_modality(name, key, m, config) for m in pair))
    options['pairs'] = tuple(pairs)
    options['pair'] = pairs[0]
    rerank_k = options['rerank_k']
    if rerank_k and len(pairs) > 1:
      raise ValueError(f'config.evals.{name}: rerank_k re-ranks one pair (the ITM head\'s); give '
                       'pair=(a, b) rather than pairs.')
    if isinstance(rerank_k, bool) or not isinstance(rerank_k, int) or rerank_k < 0:
      raise ValueError(f'config.evals.{name}: rerank_k must be an int >= 0, got {rerank_k!r}.')
    itm = config.model.heads.get('itm')
    if rerank_k and (itm is None or set(itm.get('pair', ())) != set(options['pair'])):
      raise ValueError(f'config.evals.{name}: rerank_k > 0 re-ranks with the ITM head, but '
                       f"config.model.heads has no itm head on pair {options['pair']}.")
    if options['rerank_score'] not in cls.RERANK_SCORES:
      raise ValueError(f"config.evals.{name}: rerank_score must be one of {cls.RERANK_SCORES}, "
                       f"got {options['rerank_score']!r}.")
    return options

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    self.pairs, self.pair = self.options['pairs'], self.options['pair']
    self.modalities = tuple(dict.fromkeys(m for pair in self.pairs for m in pair))
    self.rerank_k = self.options['rerank_k']
    self._embed = self.jit(self._embed_batch)
    self._match = self.jit(lambda params, encoded: self.model.apply(
        {'params': params}, 'itm', encoded, method=type(self.model).fused_logits))
    self._logit_scale = self.jit(
        lambda params: self.model.apply({'params': params}, {})['logit_scale'])
    self._ranks = {}     # modality -> rank of its training entry (its items axis is one more)

  def inputs(self):
    return self.modalities

  def _training_rank(self, modality: str) -> int:
    if modality not in self._ranks:
      spec = self.source.op(modality).spec(1)
      self._ranks[modality] = len(spec[modality][0])
    return self._ranks[modality]

  def _items(self, params: common.Params, batch: common.Batch, modality: str) -> dict[str, Any]:
    """One modality's items of a batch: embedding [B, K, D] and valid [B, K] (K = 1 without
    an items axis), and the tower outputs the ITM head needs when re-ranking."""
    entries = common.modality_entries(batch, modality)
    has_items = batch[modality].ndim > self._training_rank(modality)
    b = batch[modality].shape[0]
    k = batch[modality].shape[1] if has_items else 1
    flat = {key: v.reshape(b * k, *v.shape[2 if has_items else 1:]) for key, v in entries.items()}
    out = self.model.apply({'params': params}, flat, train=False)
    mask = f'{modality}_mask'
    valid = (entries[mask].reshape(b, k, -1).any(axis=-1) if mask in entries
             else jnp.ones((b, k), jnp.bool_))
    items = {'embedding': out['embeddings'][modality].reshape(b, k, -1), 'valid': valid}
    if self.rerank_k:
      items.update(tokens=out['tokens'][modality].reshape(b, k, *out['tokens'][modality].shape[1:]),
                   mask=out['masks'][modality].reshape(b, k, -1),
                   pooled=out['pooled'][modality].reshape(b, k, -1))
    return items

  def _embed_batch(self, params: common.Params, batch: common.Batch) -> dict[str, Any]:
    return {f'{m}/{key}': v for m in self.modalities
            for key, v in self._items(params, batch, m).items()}

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    flat = self.collect(lambda batch: self._embed(params, batch))
    rows = {m: {key.split('/', 1)[1]: v for key, v in flat.items() if key.startswith(f'{m}/')}
            for m in self.modalities}
    num_examples = len(rows[self.modalities[0]].get('valid', ()))
    common.check_not_empty(self, num_examples)
    items = {}
    for m in self.modalities:
      valid = rows[m]['valid']
      empty = np.flatnonzero(~valid.any(axis=1))
      if empty.size:
        raise self.error(f'{empty.size} examples of split {self.split!r} have no {m} item (all '
                         f'{m}_mask False); retrieval is undefined for them.')
      items[m] = {key: v[valid] for key, v in rows[m].items() if key != 'valid'}
      items[m]['owner'] = np.nonzero(valid)[0]
      items[m]['embedding'] = items[m]['embedding'].astype(np.float32)
    for a, b in self.pairs:
      yield from self._pair_recalls(params, items, a, b)
    for m in self.modalities:
      yield f'num_{m}', float(len(items[m]['owner']))

  def _pair_recalls(self, params, items, a: str, b: str) -> Iterator[tuple[str, float]]:
    za, zb, owner_a, owner_b = (items[a]['embedding'], items[b]['embedding'], items[a]['owner'],
                                items[b]['owner'])

    def recalls(rerank=None):
      ab = _recall_blocks(za, zb, lambda q: owner_b[None, :] == owner_a[q][:, None],
                          rerank=rerank and (rerank[0], rerank[1]))
      ba = _recall_blocks(zb, za, lambda q: owner_a[None, :] == owner_b[q][:, None],
                          rerank=rerank and (rerank[0], lambda q, c: rerank[1](c, q)))
      return ab, ba

    suffix = ''
    results = [recalls()]
    if self.rerank_k:
      # The contrastive logit of a pair, added to the ITM score for 'itm+contrastive'.
      scale = 0.0
      if self.options['rerank_score'] == 'itm+contrastive':
        scale = float(sharding.to_host(self._logit_scale(params)))

      def match(ia, ib):
        contrastive = scale * np.sum(za[ia] * zb[ib], axis=-1)
        return self._match_scores(params, items, ia, ib) + contrastive
      results.append(recalls((self.rerank_k, match)))
    for result in results:
      for (x, y), recall in zip(((a, b), (b, a)), result):
        for k, r in zip(KS, recall):
          yield f'{direction(x, y)}{suffix}_r{k}', r
      suffix = '_rerank'

  def _match_scores(self, params, items, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """ITM match logit minus no-match logit of the item pairs (a[ia], b[ib]), [P] float32, in
    fixed-size chunks (one compilation; the last chunk padded by repeating a pair)."""
    size = self.batch_size
    scores = []
    for start in range(0, len(ia), size):
      picked = {m: np.resize(idx[start:start + size], size)
                for m, idx in zip(self.pair, (ia, ib))}
      encoded = {m: towers.Encoded(tokens=items[m]['tokens'][i], mask=items[m]['mask'][i],
                                   pooled=items[m]['pooled'][i], embedding=None)
                 for m, i in picked.items()}
      logits = self._match(params, self.replicate(encoded))
      scores.append((logits[:, 1] - logits[:, 0])[:min(size, len(ia) - start)])
    return np.concatenate([np.asarray(s, np.float32) for s in sharding.to_host(scores)])


def _recall_blocks(queries: np.ndarray, candidates: np.ndarray, positive_fn,
                   rerank=None) -> list[float]:
  """Recall@KS of queries [Nq, D] against candidates [Nc, D], scored a block of rows at a time.

  positive_fn(query_indices [b]) -> [b, Nc] bool marks each query's positives.
  rerank=(k, score_fn): each query's top-k candidates by the dot product are re-ordered by
  score_fn(query_indices [P], candidate_indices [P]) -> [P] and ranked above all the others.
  """
  rows = max(1, _SCORE_BLOCK_ELEMENTS // candidates.shape[0])
  hits = []
  for start in range(0, queries.shape[0], rows):
    q = np.arange(start, min(start + rows, queries.shape[0]))
    sim = queries[q] @ candidates.T                                  # [b, Nc]
    if rerank is not None:
      k, score_fn = rerank
      k = min(k, candidates.shape[0])
      top = np.argpartition(-sim, k - 1, axis=1)[:, :k]              # [b, k], any order
      scores = score_fn(np.repeat(q, k), top.reshape(-1)).reshape(len(q), k)
      # Re-ranked candidates sit above every other one, ordered by the ITM score; the others
      # keep their contrastive order below them (unit-vector dot products lie in [-1, 1]).
      reranked = sim - np.abs(sim).max() - 1.0 + scores.min()
      reranked[np.arange(len(q))[:, None], top] = scores
      sim = reranked
    hits.append(metrics.retrieval_hits(sim, positive_fn(q), KS))
  return [float(h) for h in np.concatenate(hits, axis=1).mean(axis=1)]
