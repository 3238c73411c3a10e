"""Zero-shot classification: class names turned into prompts, examples of a modality matched to
them.

CLIP's recipe: every class is embedded under several prompt templates (through the `prompts`
modality's own input op and tower), the embeddings are averaged per class and re-normalised
(prompt ensembling), each example of `modality` takes its nearest class.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mmfusion.evals import common
from mmfusion.evals import metrics


class ZeroShot(common.Evaluator):
  """Yields accuracy, macro_f1 and num_examples over `split` (optionally filtered by keep_if).

  Options (besides split, batch_size, keep_if): modality, the one classified; prompts, the
  modality the class prompts are written in; templates, a tuple of strings with one '{}' each
  where the class name goes, e.g. ('a {}.', 'a picture of a {}.').
  """
  TYPE = 'zeroshot'
  READS_LABELS = True
  OPTIONS = {**common.Evaluator.OPTIONS, 'templates': ('a {}.',), 'modality': common.REQUIRED,
             'prompts': common.REQUIRED}

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    self.modality, self.prompt_modality = self.options['modality'], self.options['prompts']
    self.templates = tuple(self.options['templates'])
    embed = lambda m: lambda out: out['embeddings'][m]
    self._embed = self.predict(embed(self.modality))
    self._embed_prompts = self.predict(embed(self.prompt_modality))
    self._prompt_inputs = {}     # class names -> prompt entries: prepared once, not every run

  @classmethod
  def check_options(cls, name, options, config):
    options = super().check_options(name, options, config)
    for key in ('modality', 'prompts'):
      cls.check_modality(name, key, options[key], config)
    templates = options['templates']
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
      raise ValueError(f'config.evals.{name}: templates must be a non-empty tuple of strings, '
                       f'got {templates!r}.')
    for template in templates:
      if not isinstance(template, str) or template.count('{}') != 1:
        raise ValueError(f"config.evals.{name}: each template needs exactly one '{{}}' for the "
                         f'class name, got {template!r}.')
      try:
        template.format('x')
      except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f'config.evals.{name}: template {template!r} is not a valid format '
                         f'string: {e}') from e
    return options

  def inputs(self):
    return (self.modality, 'label')

  def prompts(self, class_names: Sequence[str]) -> list[str]:
    """Class-major: all templates of class 0, then class 1, ..."""
    return [t.format(c) for c in class_names for t in self.templates]

  def class_embeddings(self, params: common.Params, class_names: Sequence[str]) -> np.ndarray:
    """[C, D] float32: per-class mean over templates, re-normalised to unit length."""
    key = tuple(class_names)
    if key not in self._prompt_inputs:
      self._prompt_inputs[key] = self.raw_inputs(self.prompt_modality, self.prompts(class_names))
    emb = common.embed_inputs(self, self._embed_prompts, params, self._prompt_inputs[key],
                              self.batch_size)
    return ensemble(emb, len(class_names), len(self.templates))

  def dataset_classes(self, params: common.Params) -> tuple[list[str], np.ndarray]:
    """(the dataset's class names, their [C, D] prompt embeddings); no names fails."""
    names = self.source.class_names()
    if not names:
      raise self.error('the dataset has no class names.')
    return names, self.class_embeddings(params, names)

  def checked_rows(self, fn, num_classes: int) -> tuple[dict[str, np.ndarray], int]:
    """`collect(fn)` (whose rows carry 'label') and their count; empty or bad labels fail."""
    rows = self.collect(fn)
    num_examples = len(rows.get('label', ()))
    common.check_not_empty(self, num_examples)
    common.check_labels(self, rows['label'], num_classes)
    return rows, num_examples

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    names, classes = self.dataset_classes(params)
    rows, num_examples = self.checked_rows(lambda batch: {
        'embedding': self._embed(params, common.modality_entries(batch, self.modality)),
        'label': batch['label'],
    }, len(names))

    scores = rows['embedding'].astype(np.float32) @ classes.T     # [N, C]
    pred = np.argmax(scores, axis=1)
    yield 'accuracy', metrics.accuracy(pred, rows['label'])
    yield 'macro_f1', metrics.macro_f1(pred, rows['label'], len(names))
    yield 'num_examples', float(num_examples)


def ensemble(prompt_embeddings: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
  """[C * T, D] class-major prompt embeddings -> [C, D]: the mean over templates, re-normalised.

  Averaging unit vectors shrinks them by how much the templates disagree; without the
  re-normalisation, classes with consistent prompts would win the argmax by norm alone.
  """
  emb = prompt_embeddings.reshape(num_classes, num_templates, -1).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)
