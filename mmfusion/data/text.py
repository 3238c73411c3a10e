"""The text modality's preprocessing: captions as op 'text' and question-answer pairs as op
'question', tokenized with the run's sentencepiece model; and the two vocabularies derived from
a dataset's train split, each computed once and cached next to the dataset: the tokenizer
(trained on the captions) and the VQA answer classes.

Strings are tokenized on the host (`host`), never inside tf.data: a Python function still running
in a tf.data thread when its iterator is dropped (at exit, on an exception) can deadlock.
"""
from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mmfusion.data import ops
from mmfusion.data import tokenizer as tokenizer_lib
from mmfusion.data.tf_lazy import tf, tfds  # imported at first use

if TYPE_CHECKING:
  from mmfusion.data import sources   # reading a dataset imports TensorFlow


def num_texts(feature: Any) -> int:
  """1 for a Text feature, K for a Sequence of Text of fixed length K, else 0."""
  if isinstance(feature, tfds.features.Text):
    return 1
  if (isinstance(feature, tfds.features.Sequence)
      and isinstance(feature.feature, tfds.features.Text) and feature.shape[0]):
    return feature.shape[0]
  return 0


def pick(u: tf.Tensor, num: int) -> tf.Tensor:
  """Uniform numbers [B] in [0, 1) -> indices [B] in [0, num)."""
  return tf.minimum(tf.cast(u * num, tf.int32), num - 1)


def _is_strings(x: np.ndarray) -> bool:
  return x.dtype.kind in ('O', 'S')


def tokenize(tokenizer: tokenizer_lib.Tokenizer, texts: np.ndarray,
             max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Strings (bytes) [...] -> ids int32 [..., max_len], mask bool [..., max_len]."""
  texts = np.asarray(texts)
  ids, mask = tokenizer.encode(
      [t.decode('utf-8') if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)], max_len)
  return ids.reshape(*texts.shape, max_len), mask.reshape(*texts.shape, max_len)


class _TokenOp(ops.Op):
  """Shared by the ops whose entries are token ids: texts read as [K] strings per example, one
  chosen per example in training, all K kept in evaluation ([B, K, L])."""
  feature = ''

  def num_per_example(self) -> int:
    return num_texts(self.source.features[self.feature])

  def check(self):
    super().check()
    if not self.num_per_example():
      raise ValueError(f'dataset {self.source.where}: {self.feature!r} must be Text, or a '
                       f'Sequence of Text with a fixed length; it is '
                       f'{self.source.features[self.feature]!r}')

  @property
  def max_len(self) -> int:
    return self.config.tokenizer.max_len

  def spec(self, batch_size):
    shape = (batch_size, self.max_len)
    return {self.name: (shape, np.int32), f'{self.name}_mask': (shape, np.bool_)}

  def bytes_per_example(self):
    return self.num_per_example() * self.max_len * 5      # int32 ids + bool mask

  def host(self, batch):
    if self.name not in batch or not _is_strings(batch[self.name]):
      return {}
    ids, mask = tokenize(self.source.tokenizer, batch[self.name], self.max_len)
    return {self.name: ids, f'{self.name}_mask': mask}

  def choose(self, batch, index):
    """The texts at `index` [B] of each example's K (ids and mask, or still strings)."""
    keys = [k for k in (self.name, f'{self.name}_mask') if k in batch]
    return {k: tf.gather(batch[k], index, batch_dims=1) for k in keys}

  def from_raw(self, values: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(values, str):
      raise ValueError(f'{self.name}: expected a sequence of strings, got one string')
    ids, mask = self.source.tokenizer.encode(list(values), self.max_len)
    return {self.name: ids, f'{self.name}_mask': mask}


@ops.register
class TextOp(_TokenOp):
  """Feature `captions` (Text, or K of them) -> text int32 [B, L] and text_mask bool [B, L] (one
  caption per example, drawn afresh each epoch); in evaluation all K: [B, K, L]."""
  name = 'text'
  feature = 'captions'
  num_random = 1

  def features(self):
    return (self.feature,)

  def standardize(self, ex):
    return {'text': tf.reshape(ex[self.feature], [-1])}            # [K] strings

  def train(self, batch, u):
    return self.choose(batch, pick(u[:, 0], self.num_per_example()))


@ops.register
class QuestionOp(_TokenOp):
  """Features `questions` and `answers` (Text, or Q of each) -> question int32 [B, L],
  question_mask bool [B, L] and answer int32 [B], its index in the answer vocabulary (-1 if not
  in it): one question per example, drawn afresh each epoch; in evaluation all Q ([B, Q, L],
  answer [B, Q])."""
  name = 'question'
  feature = 'questions'
  num_random = 1

  def features(self):
    return ('questions', 'answers')

  def check(self):
    super().check()
    if num_texts(self.source.features['answers']) != self.num_per_example():
      raise ValueError(f'dataset {self.source.where}: "questions" and "answers" must be Text, '
                       'or Sequences of Text of the same fixed length.')

  def spec(self, batch_size):
    return {**super().spec(batch_size), 'answer': ((batch_size,), np.int32)}

  @functools.cached_property
  def answer_table(self) -> tf.lookup.StaticHashTable:
    """Answer string -> its index in the answer vocabulary, -1 outside it."""
    vocab = self.source.answers
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(vocab, tf.string),
                                            tf.range(len(vocab), dtype=tf.int32)),
        default_value=-1)

  def standardize(self, ex):
    return {'question': tf.reshape(ex['questions'], [-1]),                     # [Q] strings
            'answer': self.answer_table.lookup(tf.reshape(ex['answers'], [-1]))}  # [Q] int32

  def train(self, batch, u):
    index = pick(u[:, 0], self.num_per_example())
    return {**self.choose(batch, index), 'answer': tf.gather(batch['answer'], index, batch_dims=1)}


# ------------------------------------------------------------------------ vocabularies


def get_tokenizer(source: sources.Source):
  """config.tokenizer.model (sentencepiece `.model` or Hugging Face `tokenizer.json`) if set;
  else a sentencepiece model trained on the train split's captions, cached under
  <data_dir>/tokenizers/ and reused by every run on the dataset."""
  config = source.config
  pad_id = config.tokenizer.get('pad_id', -1)
  conventions = dict(pad_id=None if pad_id < 0 else pad_id,
                     attend_padding=config.tokenizer.get('attend_padding', False))
  if config.tokenizer.model:
    path = os.path.expanduser(config.tokenizer.model)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'config.tokenizer.model: tokenizer file not found: {path}')
    return tokenizer_lib.load(path, **conventions)
  vocab_size = config.tokenizer.vocab_size
  path = source.cache_path(f'v{vocab_size}.model')
  if not tf.io.gfile.exists(path):
    tokenizer_lib.train_tokenizer(_texts(source, TextOp.feature), path, vocab_size)
  return tokenizer_lib.Tokenizer(path, **conventions)


def answer_vocab(source: sources.Source) -> list[str]:
  """The VQA answer classes: every answer of the train split's questions, sorted.

  Computed once per dataset and cached as json next to the tokenizer, so every run and
  evaluation on the dataset numbers answers the same way. Answers outside it (in eval splits)
  are -1 in the batches.
  """
  if not num_texts(source.features['answers'] if 'answers' in source.features else None):
    raise ValueError(f'the VQA answer classes come from an "answers" feature (Text, or a '
                     f'Sequence of Text with a fixed length); dataset {source.where} has '
                     f'{sorted(source.features.keys())}.')
  path = source.cache_path('answers.json')
  if not tf.io.gfile.exists(path):
    answers = sorted(set(_texts(source, 'answers')))
    tf.io.gfile.makedirs(os.path.dirname(path))
    # Written next to the target then renamed, like the tokenizer: processes that compute
    # the same vocabulary at once never leave half a file.
    tmp_path = f'{path}.tmp-{os.getpid()}'
    with tf.io.gfile.GFile(tmp_path, 'w') as f:
      json.dump(answers, f)
    tf.io.gfile.rename(tmp_path, path, overwrite=True)
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _texts(source: sources.Source, feature: str) -> Iterator[str]:
  """Every string of a text feature over the whole train split, in file order."""
  if not num_texts(source.features[feature] if feature in source.features else None):
    raise ValueError(f'dataset {source.where} needs a {feature!r} feature (Text, or a Sequence '
                     f'of Text with a fixed length) to build its vocabulary; it has '
                     f'{sorted(source.features.keys())}')
  ds = source.read(source.base_train_split, [feature]).map(lambda ex: tf.reshape(ex[feature], [-1]))
  for chunk in ds.unbatch().batch(4096).as_numpy_iterator():
    yield from (t.decode('utf-8') for t in chunk)
