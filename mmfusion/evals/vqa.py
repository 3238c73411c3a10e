"""Visual question answering as classification over the answer vocabulary: the model's VQA head
on (context, question) pairs, scored against the dataset's answers.

Each eval example carries Q questions ('question' [B,Q,L], 'answer' [B,Q], -1 = an answer
outside the vocabulary, which counts as wrong). The context's tower runs once per example and
the question modality's once per question; the fusion and head run per pair.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmfusion.evals import common


class VQA(common.Evaluator):
  """Yields accuracy (all questions), accuracy_q<i> (the i-th question of every example: one
  question type each in the embedded dataset), majority_baseline, unknown_answers and
  num_questions.

  majority_baseline is what chance means here: the accuracy of a blind answerer that gives,
  for every i-th question, the answer most frequent among the i-th questions of this split.
  It never looks at the image, and it knows the split's answer counts, so it is an upper
  bound for any answerer that reads no image.
  """
  TYPE = 'vqa'
  # questions: the input op that reads them ('question': written, Q per example;
  # 'spoken_question': one spoken per example). absent: modalities left out (the fusion's
  # learned missing tokens stand in for them), e.g. ('image',) for a blind answerer.
  OPTIONS = {**common.Evaluator.OPTIONS, 'questions': 'question', 'absent': ()}

  @classmethod
  def check_options(cls, name, options, config):
    options = super().check_options(name, options, config)
    common.require_head(name, config, 'vqa', 'a VQA head (and config.model.fusion)')
    head = config.model.heads.vqa
    absent = tuple(options['absent'])
    stand_ins = dict(config.model.fusion.get('modality_dropout', {}))
    for m in absent:
      if m not in (head.question, head.context) or m not in stand_ins:
        raise ValueError(f'config.evals.{name}.absent = {absent!r}: {m!r} must be a modality of '
                         'the VQA head named in config.model.fusion.modality_dropout (whose '
                         'missing token stands in for it).')
    options['absent'] = absent
    return options

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    head = self.config.model.heads.vqa
    self.question, self.context = head.question, head.context
    self.absent = self.options['absent']
    self._predict = self.jit(self._answers)

  def inputs(self):
    return tuple(m for m in (self.context,) if m not in self.absent) + (
        self.options['questions'],)

  def _answers(self, params: common.Params, batch: common.Batch) -> dict[str, Any]:
    variables = {'params': params}
    b, q, length = batch['question'].shape
    encode = type(self.model).encode
    encoded = {}
    if self.context not in self.absent:
      context = self.model.apply(variables, self.context, batch[self.context],
                                 batch.get(f'{self.context}_mask'), method=encode)
      repeat = lambda x: jnp.repeat(x, q, axis=0)     # example i for each of its q questions
      encoded[self.context] = jax.tree.map(repeat, context)
    if self.question not in self.absent:
      encoded[self.question] = self.model.apply(
          variables, self.question, batch['question'].reshape(b * q, length),
          batch['question_mask'].reshape(b * q, length), method=encode)
    logits = self.model.apply(variables, 'vqa', encoded, method=type(self.model).fused_logits)
    return {'pred': jnp.argmax(logits, axis=-1).reshape(b, q), 'answers': batch['answer']}

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    rows = self.collect(lambda batch: self._predict(params, batch))
    num_examples = len(rows.get('answers', ()))
    common.check_not_empty(self, num_examples)
    pred, answers = np.asarray(rows['pred']), np.asarray(rows['answers'])
    correct = (pred == answers) & (answers >= 0)
    yield 'accuracy', float(correct.mean())
    for i in range(answers.shape[1]):
      yield f'accuracy_q{i}', float(correct[:, i].mean())
    yield 'majority_baseline', majority_baseline(answers)
    yield 'unknown_answers', float((answers < 0).mean())
    yield 'num_questions', float(answers.size)


def majority_baseline(answers_nq: np.ndarray) -> float:
  """Accuracy of answering each question slot q with its most frequent known answer
  (answers [N, Q], -1 = outside the vocabulary, never right)."""
  right = 0
  for column in answers_nq.T:
    known = column[column >= 0]
    right += np.bincount(known).max() if known.size else 0
  return float(right / answers_nq.size)
