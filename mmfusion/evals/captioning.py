"""Captioning: the model's caption head writes its target modality (a caption) for each example
of its context modality (greedy or beam search, with a key/value cache), scored with corpus
BLEU-4 against the example's reference texts and with the accuracy of its attribute words
(colours, shapes, sizes) against the example's objects, where the dataset has them.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mmfusion.evals import common
from mmfusion.evals import metrics
from mmfusion.models import decoder as decoder_lib


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

  @classmethod
  def check_options(cls, name, options, config):
    options = super().check_options(name, options, config)
    common.require_head(name, config, 'caption', 'a caption head')
    if options['decode'] not in ('greedy', 'beam'):
      raise ValueError(f"config.evals.{name}: decode must be 'greedy' or 'beam', got "
                       f"{options['decode']!r}.")
    options['beam_size'] = common.check_positive_int(name, 'beam_size', options['beam_size'])
    penalty = options['length_penalty']
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty >= 0:
      raise ValueError(f'config.evals.{name}: length_penalty must be a number >= 0, got '
                       f'{penalty!r}.')
    return options

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    head = self.config.model.heads.caption
    self.target, self.context = head.target, head.context
    self.beam_size = self.options['beam_size']
    self._generate = self.jit(self._captions)

  def inputs(self):
    objects = ('objects',) if 'objects' in self.source.features else ()
    return (self.context, self.target) + objects

  def _captions(self, params: common.Params, batch: common.Batch) -> dict[str, Any]:
    variables = {'params': params}
    context = self.model.apply(variables, self.context, batch[self.context],
                               batch.get(f'{self.context}_mask'), method=type(self.model).encode)
    head = self.model.heads['caption']
    decoder, dec_params = head.decoder, params['caption']['decoder']
    max_len = decoder.max_len
    if self.options['decode'] == 'greedy':
      ids = decoder_lib.greedy_decode(decoder, dec_params, context.tokens, context.mask,
                                      max_len=max_len)
    else:
      ids, _ = decoder_lib.beam_search(decoder, dec_params, context.tokens, context.mask,
                                       max_len=max_len, beam_size=self.beam_size,
                                       length_penalty=self.options['length_penalty'])
    out = {'ids': ids, 'references': batch[self.target],
           'references_mask': batch[f'{self.target}_mask']}
    out.update({k: v for k, v in batch.items() if k.startswith('object_')})
    return out

  def attribute_names(self) -> dict[str, list[str]]:
    if 'objects' not in self.source.features:
      return {}
    return self.source.op('objects').names()

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    rows = self.collect(lambda batch: self._generate(params, batch))
    num_examples = len(rows.get('ids', ()))
    common.check_not_empty(self, num_examples)
    tokenizer = self.source.tokenizer
    hypotheses = [t.split() for t in tokenizer.decode(rows['ids'])]
    references = []
    for ids, mask in zip(rows['references'], rows['references_mask']):
      real = mask.any(axis=-1)
      references.append([t.split() for t in tokenizer.decode(ids[real])])
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
