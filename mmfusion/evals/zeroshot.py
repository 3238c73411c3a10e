"""Zero-shot classification: class names turned into text prompts, images matched to them.

CLIP's recipe: every class is embedded under several prompt templates, the embeddings are
averaged per class and re-normalised (prompt ensembling), each image takes its nearest class.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mmfusion.evals import common
from mmfusion.evals import metrics


class ZeroShot(common.Evaluator):
  """Yields accuracy, macro_f1 and num_examples over `split` (optionally filtered by keep_if).

  Options (besides split, batch_size, keep_if): templates, a tuple of strings with one '{}'
  each where the class name goes, e.g. ('a {}.', 'a picture of a {}.').
  """
  TYPE = 'zeroshot'
  OPTIONS = {**common.Evaluator.OPTIONS, 'templates': ('a {}.',)}

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    self.templates = self._check_templates(self.options['templates'])
    self._embed_image = self.predict(common.image_embeddings)
    self._embed_text = self.predict(common.text_embeddings)
    self._prompt_tokens = {}     # class names -> (ids, mask): tokenized once, not every run

  def _check_templates(self, templates: Any) -> tuple[str, ...]:
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
      raise self.error(f'templates must be a non-empty tuple of strings, got {templates!r}.')
    for template in templates:
      if not isinstance(template, str) or template.count('{}') != 1:
        raise self.error(f"each template needs exactly one '{{}}' for the class name, "
                         f'got {template!r}.')
      try:
        template.format('x')
      except (IndexError, KeyError, ValueError) as e:
        raise self.error(f'template {template!r} is not a valid format string: {e}') from e
    return tuple(templates)

  def prompts(self, class_names: Sequence[str]) -> list[str]:
    """Class-major: all templates of class 0, then class 1, ..."""
    return [t.format(c) for c in class_names for t in self.templates]

  def class_embeddings(self, params: common.Params, class_names: Sequence[str]) -> np.ndarray:
    """[C, D] float32: per-class mean over templates, re-normalised to unit length."""
    key = tuple(class_names)
    if key not in self._prompt_tokens:
      self._prompt_tokens[key] = self.tokenizer.encode(self.prompts(class_names),
                                                       self.config.tokenizer.max_len)
    ids, mask = self._prompt_tokens[key]
    emb = common.embed_texts(self, self._embed_text, params, np.asarray(ids), np.asarray(mask),
                             self.batch_size)
    emb = emb.reshape(len(class_names), len(self.templates), -1).mean(axis=1)
    # Averaging unit vectors shrinks them by how much the templates disagree; without the
    # re-normalisation, classes with consistent prompts would win the argmax by norm alone.
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    names = self.class_names()
    if not names:
      raise self.error('the dataset has no class names.')
    classes = self.class_embeddings(params, names)
    rows = self.collect(lambda batch: {
        'image': self._embed_image(params, {'image': batch['image']}),
        'label': batch['label'],
    })
    num_examples = len(rows.get('label', ()))
    common.check_not_empty(self, num_examples)
    common.check_labels(self, rows['label'], len(names))

    scores = rows['image'].astype(np.float32) @ classes.T        # [N, C]
    pred = np.argmax(scores, axis=1)
    yield 'accuracy', metrics.accuracy(pred, rows['label'])
    yield 'macro_f1', metrics.macro_f1(pred, rows['label'], len(names))
    yield 'num_examples', float(num_examples)
