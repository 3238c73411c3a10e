"""Image<->text retrieval recall@k, COCO-style: every image with all K of its captions.

Image->text: an image hits at k if ANY of its captions ranks in the top k of all captions.
Text->image: each caption is a query; it hits at k if its own image ranks in the top k.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mmfusion.evals import common
from mmfusion.evals import metrics

KS = (1, 5, 10)
# Rows of the [queries, candidates] score matrix scored at once: bounds host memory to
# ~16 MiB of float32 (plus masks) whatever the split size, instead of N x N*K at once.
_SCORE_BLOCK_ELEMENTS = 1 << 22


class Retrieval(common.Evaluator):
  """Yields i2t_r{1,5,10}, t2i_r{1,5,10} (fractions), num_images and num_captions.

  Captions whose mask is all False are padding (an image with fewer than K captions) and
  take part neither as queries nor as candidates; they are counted out of num_captions.
  Score ties are broken at random in expectation (`metrics.retrieval_hits`), so identical
  caption texts under different images share credit rather than each getting it.
  """
  TYPE = 'retrieval'
  OPTIONS = dict(common.Evaluator.OPTIONS)

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    self._embed = self.jit(self._embed_batch)

  def _embed_batch(self, params: common.Params, batch: common.Batch) -> dict[str, Any]:
    b, k, length = batch['captions'].shape
    apply = lambda inputs: self.model.apply({'params': params}, inputs, train=False)
    text = apply({'text': batch['captions'].reshape(b * k, length),
                  'text_mask': batch['captions_mask'].reshape(b * k, length)})
    return {
        'image': common.image_embeddings(apply({'image': batch['image']})),
        'text': common.text_embeddings(text).reshape(b, k, -1),
        'caption_valid': batch['captions_mask'].any(axis=-1),
    }

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
    yield 'num_images', float(num_images)
    yield 'num_captions', float(len(owner))


def _recall_blocks(queries: np.ndarray, candidates: np.ndarray, positive_fn) -> list[float]:
  """Recall@KS of queries [Nq, D] against candidates [Nc, D], scored a block of rows at a time.

  positive_fn(query_indices [b]) -> [b, Nc] bool marks each query's positives.
  """
  rows = max(1, _SCORE_BLOCK_ELEMENTS // candidates.shape[0])
  hits = []
  for start in range(0, queries.shape[0], rows):
    q = np.arange(start, min(start + rows, queries.shape[0]))
    hits.append(metrics.retrieval_hits(queries[q] @ candidates.T, positive_fn(q), KS))
  return [float(h) for h in np.concatenate(hits, axis=1).mean(axis=1)]
