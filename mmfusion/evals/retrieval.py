"""Image<->text retrieval recall@k, COCO-style: every image with all K of its captions.

Image->text: an image hits at k if ANY of its captions ranks in the top k of all captions.
Text->image: each caption is a query; it hits at k if its own image ranks in the top k.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mmfusion import sharding
from mmfusion.evals import common
from mmfusion.evals import metrics

KS = (1, 5, 10)
# Rows of the [queries, candidates] score matrix scored at once: bounds host memory to
# ~16 MiB of float32 (plus masks) whatever the split size, instead of N x N*K at once.
_SCORE_BLOCK_ELEMENTS = 1 << 22


class Retrieval(common.Evaluator):
  """Yields i2t_r{1,5,10}, t2i_r{1,5,10} (fractions), num_images and num_captions.

  rerank_k > 0 (needs the model's ITM head): each query's top rerank_k candidates by the
  contrastive score are re-ordered, and the recalls of that ranking are yielded too, as
  i2t_rerank_r{1,5,10} and t2i_rerank_r{1,5,10}. rerank_score says by what: 'itm', the ITM
  head's match-minus-no-match logit alone (ALBEF), or 'itm+contrastive' (default), that plus
  the contrastive logit (logit_scale x cosine), as BLIP adds the similarity to the ITM score:
  both are log-odds, and the sum keeps what each knows.

  Captions whose mask is all False are padding (an image with fewer than K captions) and
  take part neither as queries nor as candidates; they are counted out of num_captions.
  Score ties are broken at random in expectation (`metrics.retrieval_hits`), so identical
  caption texts under different images share credit rather than each getting it.
  """
  TYPE = 'retrieval'
  OPTIONS = {**common.Evaluator.OPTIONS, 'rerank_k': 0, 'rerank_score': 'itm+contrastive'}
  RERANK_SCORES = ('itm', 'itm+contrastive')

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    self.rerank_k = self.options['rerank_k']
    if isinstance(self.rerank_k, bool) or not isinstance(self.rerank_k, int) or self.rerank_k < 0:
      raise self.error(f'rerank_k must be an int >= 0, got {self.rerank_k!r}.')
    if self.rerank_k and not self.config.model.heads.itm:
      raise self.error('rerank_k > 0 re-ranks with the ITM head, but config.model.heads.itm is '
                       'False.')
    if self.options['rerank_score'] not in self.RERANK_SCORES:
      raise self.error(f"rerank_score must be one of {self.RERANK_SCORES}, got "
                       f"{self.options['rerank_score']!r}.")
    self._embed = self.jit(self._embed_batch)
    self._match = self.jit(lambda params, pairs: self.model.apply(
        {'params': params}, *pairs, method=type(self.model).match_logits))
    self._logit_scale = self.jit(
        lambda params: self.model.apply({'params': params}, {})['logit_scale'])

  def _embed_batch(self, params: common.Params, batch: common.Batch) -> dict[str, Any]:
    b, k, length = batch['captions'].shape
    apply = lambda inputs: self.model.apply({'params': params}, inputs, train=False)
    text = apply({'text': batch['captions'].reshape(b * k, length),
                  'text_mask': batch['captions_mask'].reshape(b * k, length)})
    image = apply({'image': batch['image']})
    out = {
        'image': common.image_embeddings(image),
        'text': common.text_embeddings(text).reshape(b, k, -1),
        'caption_valid': batch['captions_mask'].any(axis=-1),
    }
    if self.rerank_k:   # what the ITM head needs, kept for the top-k pairs
      out.update(image_tokens=image['tokens']['image'], image_pooled=image['pooled']['image'],
                 text_tokens=text['tokens']['text'].reshape(b, k, length, -1),
                 text_pooled=text['pooled']['text'].reshape(b, k, -1),
                 text_mask=batch['captions_mask'])
    return out

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    rows = self.collect(lambda batch: self._embed(params, batch))
    num_images = len(rows.get('image', ()))
    common.check_not_empty(self, num_images)
    image = rows['image'].astype(np.float32)                        # [N, D]
    caption_valid = rows['caption_valid']                           # [N, K]
    uncaptioned = np.flatnonzero(~caption_valid.any(axis=1))
    if uncaptioned.size:
      raise self.error(f'{uncaptioned.size} images of split {self.split!r} have no caption '
                       '(all captions_mask False); image->text recall is undefined for them.')
    text = rows['text'][caption_valid].astype(np.float32)           # [M, D], image-major
    owner = np.nonzero(caption_valid)[0]                            # [M] image of each caption

    i2t = _recall_blocks(image, text, lambda q: owner[None, :] == q[:, None])
    t2i = _recall_blocks(text, image,
                         lambda q: np.arange(num_images)[None, :] == owner[q][:, None])
    for k, r in zip(KS, i2t):
      yield f'i2t_r{k}', r
    for k, r in zip(KS, t2i):
      yield f't2i_r{k}', r
    if self.rerank_k:
      images = (rows['image_tokens'], rows['image_pooled'])
      texts = (rows['text_tokens'][caption_valid], rows['text_pooled'][caption_valid],
               rows['text_mask'][caption_valid])
      # The contrastive logit of a pair, added to the ITM score for 'itm+contrastive'.
      scale = 0.0
      if self.options['rerank_score'] == 'itm+contrastive':
        scale = float(sharding.to_host(self._logit_scale(params)))

      def match(image_idx, text_idx):
        contrastive = scale * np.sum(image[image_idx] * text[text_idx], axis=-1)
        return self._match_scores(params, images, texts, image_idx, text_idx) + contrastive
      i2t = _recall_blocks(image, text, lambda q: owner[None, :] == q[:, None],
                           rerank=(self.rerank_k, lambda q, c: match(q, c)))
      t2i = _recall_blocks(text, image,
                           lambda q: np.arange(num_images)[None, :] == owner[q][:, None],
                           rerank=(self.rerank_k, lambda q, c: match(c, q)))
      for k, r in zip(KS, i2t):
        yield f'i2t_rerank_r{k}', r
      for k, r in zip(KS, t2i):
        yield f't2i_rerank_r{k}', r
    yield 'num_images', float(num_images)
    yield 'num_captions', float(len(owner))

  def _match_scores(self, params, images, texts, image_idx: np.ndarray,
                    text_idx: np.ndarray) -> np.ndarray:
    """ITM match logit minus no-match logit of the pairs (images[i], texts[j]), [P] float32,
    in fixed-size chunks (one compilation; the last chunk padded by repeating a pair)."""
    size = self.batch_size
    scores = []
    for start in range(0, len(image_idx), size):
      i = np.resize(image_idx[start:start + size], size)
      j = np.resize(text_idx[start:start + size], size)
      pairs = self.replicate((images[0][i], images[1][i], texts[0][j], texts[1][j], texts[2][j]))
      logits = self._match(params, pairs)
      scores.append((logits[:, 1] - logits[:, 0])[:min(size, len(image_idx) - start)])
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
