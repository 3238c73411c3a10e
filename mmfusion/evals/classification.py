"""Supervised classification with the model's own head: argmax of the classification head's
logits vs label, on the modality the head reads (config.model.heads.classification.input).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmfusion.evals import common
from mmfusion.evals import metrics


class Classification(common.Evaluator):
  """Yields accuracy, macro_f1 and num_examples over `split` (optionally filtered by keep_if)."""
  TYPE = 'classification'
  READS_LABELS = True
  OPTIONS = dict(common.Evaluator.OPTIONS)

  @classmethod
  def check_options(cls, name, options, config):
    options = super().check_options(name, options, config)
    common.require_head(name, config, 'classification', 'a classification head')
    return options

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    head = self.config.model.heads.classification
    self.modality = head.input
    # -1 means "as many as the dataset has"; the trainer resolves it before building, a
    # notebook may not, so it is looked up (once) at the first run instead.
    num_classes = head.get('num_classes', -1)
    self.num_classes = int(num_classes) if num_classes > 0 else None
    self._predict = self.predict(self._argmax)

  def inputs(self):
    return (self.modality, 'label')

  def _argmax(self, out: dict[str, Any]) -> Any:
    if 'classification' not in out:
      raise self.error(f'the model returned no classification (outputs: {sorted(out)}).')
    logits = out['classification']['logits']
    if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
      raise self.error(f'logits have shape {logits.shape}, expected [batch, '
                       f'{self.num_classes}] (config.model.heads.classification.num_classes).')
    return jnp.argmax(logits, axis=-1)

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    if self.num_classes is None:
      self.num_classes = len(self.source.class_names())
    rows = self.collect(lambda batch: {
        'pred': self._predict(params, common.modality_entries(batch, self.modality)),
        'label': batch['label'],
    })
    num_examples = len(rows.get('label', ()))
    common.check_not_empty(self, num_examples)
    common.check_labels(self, rows['label'], self.num_classes)
    pred = np.asarray(rows['pred'], np.int64)
    yield 'accuracy', metrics.accuracy(pred, rows['label'])
    yield 'macro_f1', metrics.macro_f1(pred, rows['label'], self.num_classes)
    yield 'num_examples', float(num_examples)
