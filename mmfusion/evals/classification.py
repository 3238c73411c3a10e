"""Supervised classification with the model's own head: argmax of out['logits'] vs label.

Needs a head (config.model.head.num_classes > 0, or -1 = the dataset's) fed from the image.
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
  OPTIONS = dict(common.Evaluator.OPTIONS)

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    head = self.config.model.head
    if head.num_classes == 0 or head.num_classes < -1:
      raise self.error('type classification needs a classification head, but '
                       f'config.model.head.num_classes is {head.num_classes}.')
    if head.input != 'image':
      # Only the image goes into the forward pass here; a head on other inputs needs an
      # evaluator that also feeds them.
      raise self.error("type classification evaluates a head on the image, but "
                       f"config.model.head.input is {head.input!r}.")
    # -1 means "as many as the dataset has"; the trainer resolves it before building, a
    # notebook may not, so it is looked up (once) at the first run instead.
    self.num_classes = int(head.num_classes) if head.num_classes > 0 else None
    self._predict = self.predict(self._argmax)

  def _argmax(self, out: dict[str, Any]) -> Any:
    if 'logits' not in out:
      raise self.error(f'the model returned no "logits" (outputs: {sorted(out)}).')
    logits = out['logits']
    if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
      raise self.error(f'logits have shape {logits.shape}, expected [batch, '
                       f'{self.num_classes}] (config.model.head.num_classes).')
    return jnp.argmax(logits, axis=-1)

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    if self.num_classes is None:
      self.num_classes = len(self.class_names())
    rows = self.collect(lambda batch: {
        'pred': self._predict(params, {'image': batch['image']}),
        'label': batch['label'],
    })
    num_examples = len(rows.get('label', ()))
    common.check_not_empty(self, num_examples)
    common.check_labels(self, rows['label'], self.num_classes)
    pred = np.asarray(rows['pred'], np.int64)
    yield 'accuracy', metrics.accuracy(pred, rows['label'])
    yield 'macro_f1', metrics.macro_f1(pred, rows['label'], self.num_classes)
    yield 'num_examples', float(num_examples)
