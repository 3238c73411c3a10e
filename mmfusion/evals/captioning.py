"""Captioning: the model's caption decoder writes a caption per image (greedy or beam search,
with a key/value cache), scored with corpus BLEU-4 against the image's reference captions and
with the accuracy of its attribute words (colours, shapes, sizes) against the image's objects.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmfusion.evals import common
from mmfusion.evals import metrics
from mmfusion.models import decoder as decoder_lib

ATTRIBUTES = ('colour', 'shape', 'size')


class Captioning(common.Evaluator):
  """Yields bleu4, attribute_accuracy (images whose caption names at least one colour and one
  shape, and only colours, shapes and sizes the image's objects have), <attribute>_accuracy per
  kind (images whose caption names only true values of it, among those naming any),
  mean_length (words) and num_examples.

  Options: decode ('greedy' | 'beam'), beam_size, length_penalty (beam search).
  """
  TYPE = 'captioning'
  OPTIONS = {**common.Evaluator.OPTIONS, 'decode': 'greedy', 'beam_size': 4,
             'length_penalty': 0.6}

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    if not self.config.model.decoder.depth:
      raise self.error('type captioning needs a caption decoder: set config.model.decoder.depth.')
    if self.options['decode'] not in ('greedy', 'beam'):
      raise self.error(f"decode must be 'greedy' or 'beam', got {self.options['decode']!r}.")
    self.beam_size = common.check_positive_int(self, 'beam_size', self.options['beam_size'])
    self._generate = self.jit(self._captions)

  def _captions(self, params: common.Params, batch: common.Batch) -> dict[str, Any]:
    image = self.model.apply({'params': params}, {'image': batch['image']})
    tokens_bnw = image['tokens']['image']
    mask_bn = jnp.ones(tokens_bnw.shape[:2], jnp.bool_)
    decoder, dec_params = self.model.caption_decoder, params['caption_decoder']
    max_len = self.config.model.decoder.max_len
    if self.options['decode'] == 'greedy':
      ids = decoder_lib.greedy_decode(decoder, dec_params, tokens_bnw, mask_bn, max_len=max_len)
    else:
      ids, _ = decoder_lib.beam_search(decoder, dec_params, tokens_bnw, mask_bn, max_len=max_len,
                                       beam_size=self.beam_size,
                                       length_penalty=self.options['length_penalty'])
    out = {'ids': ids, 'captions': batch['captions'], 'captions_mask': batch['captions_mask']}
    out.update({f'object_{a}': batch[f'object_{a}'] for a in ATTRIBUTES
                if f'object_{a}' in batch})
    return out

  def attribute_names(self) -> dict[str, list[str]]:
    from mmfusion.data import pipeline
    features = pipeline.get_builder(self.config.data).info.features
    if 'objects' not in features:
      return {}
    objects = features['objects'].feature
    return {a: list(objects[a].names) for a in ATTRIBUTES if a in objects}

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    rows = self.collect(lambda batch: self._generate(params, batch))
    num_examples = len(rows.get('ids', ()))
    common.check_not_empty(self, num_examples)
    hypotheses = [t.split() for t in self.tokenizer.decode(rows['ids'])]
    references = []
    for ids, mask in zip(rows['captions'], rows['captions_mask']):
      real = mask.any(axis=-1)
      references.append([t.split() for t in self.tokenizer.decode(ids[real])])
    yield 'bleu4', metrics.bleu(hypotheses, references)
    yield from attribute_scores(hypotheses, rows, self.attribute_names()).items()
    yield 'mean_length', float(np.mean([len(h) for h in hypotheses]))
    yield 'num_examples', float(num_examples)


def attribute_scores(hypotheses: list[list[str]], rows: dict[str, np.ndarray],
                     names: dict[str, list[str]]) -> dict[str, float]:
  """Attribute words of each caption against the image's objects (object_<kind> [N, O] ids,
  -1 = no object): see Captioning for the definitions."""
  if not names or any(f'object_{a}' not in rows for a in names):
    return {}
  all_true = np.ones(len(hypotheses), bool)
  named = {a: np.zeros(len(hypotheses), bool) for a in names}
  right = {a: np.zeros(len(hypotheses), bool) for a in names}
  for i, words in enumerate(hypotheses):
    for kind, vocab in names.items():
      truth = {vocab[j] for j in rows[f'object_{kind}'][i] if j >= 0}
      said = {w for w in words if w in vocab}
      named[kind][i] = bool(said)
      right[kind][i] = bool(said) and said <= truth
      all_true[i] &= said <= truth
  complete = named.get('colour', True) & named.get('shape', True)
  scores = {'attribute_accuracy': float(np.mean(all_true & complete))}
  for kind in names:
    scores[f'{kind}_accuracy'] = float(right[kind][named[kind]].mean()) if named[kind].any() else 0.0
  return scores
