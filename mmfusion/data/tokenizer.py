"""Sentencepiece tokenization: train a model from captions, or load any `.model` file,
and turn texts into fixed-length id/mask arrays (numpy, or inside tf.data).

Conventions of the models `train_tokenizer` writes: pad_id=0, unk_id=1, bos_id=2,
eos_id=3. `encode` appends EOS to every text, truncates to `max_len` keeping EOS as the
last token, and pads with the pad id; `mask` is True on real tokens, EOS included, so a
text tower can pool at the last True position (the EOS).

Any other sentencepiece model works if it has an EOS piece. Many have no pad piece
(pad_id -1): their texts are padded with id 0 and only `mask` tells padding apart.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tensorflow as tf

from mmfusion.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID  # noqa: F401 (re-exported)


def train_tokenizer(sentences: Iterable[str], model_path: str, vocab_size: int) -> str:
  """Trains a BPE model on `sentences` and writes it atomically to `model_path`.

  Deterministic: one thread, input read in order. `hard_vocab_limit=False` because a
  small caption vocabulary may not support `vocab_size` pieces. Returns `model_path`.
  """
  if not model_path.endswith('.model'):
    raise ValueError(f'sentencepiece model path must end in .model: {model_path!r}')
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=proto,
      model_type='bpe', vocab_size=vocab_size, hard_vocab_limit=False,
      character_coverage=1.0, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
      minloglevel=2)
  directory = os.path.dirname(model_path)
  if directory:
    tf.io.gfile.makedirs(directory)
  # Written next to the target then renamed, so a reader never sees half a file (and
  # concurrent writers of the same deterministic model do not corrupt each other).
  tmp_path = f'{model_path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(tmp_path, 'wb') as f:
    f.write(proto.getvalue())
  tf.io.gfile.rename(tmp_path, model_path, overwrite=True)
  return model_path


class Tokenizer:
  """A sentencepiece model with mmfusion's fixed-length encode/decode conventions."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    if not tf.io.gfile.exists(model_path):
      raise FileNotFoundError(f'sentencepiece model not found: {model_path}')
    self._sp = spm.SentencePieceProcessor()
    try:
      with tf.io.gfile.GFile(model_path, 'rb') as f:
        self._sp.LoadFromSerializedProto(f.read())
    except (RuntimeError, OSError, tf.errors.OpError) as e:
      raise ValueError(f'not a readable sentencepiece model: {model_path} ({e})') from e
    if self._sp.eos_id() < 0:
      raise ValueError(f'sentencepiece model {model_path} has no EOS piece; mmfusion '
                       'appends EOS to every text and pools the text tower there')

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    """The id padding positions hold: the model's pad id, or 0 if it has none."""
    return max(self._sp.pad_id(), 0)

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [N, max_len], mask bool [N, max_len]); see the module doc."""
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}')
    pieces = self._sp.encode(list(texts))
    ids = np.full((len(pieces), max_len), self.pad_id, np.int32)
    lengths = np.empty(len(pieces), np.int32)
    for row, p in enumerate(pieces):
      p = p[:max_len - 1]
      ids[row, :len(p)] = p
      ids[row, len(p)] = self.eos_id
      lengths[row] = len(p) + 1
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    return ids, mask

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """One row of ids -> its sentencepiece pieces ('▁red', '</s>'): labels for per-token plots."""
    return [self._sp.id_to_piece(int(i)) for i in ids]

  def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    """ids [N, L] (or one row [L]) -> N texts; each stops at its first EOS."""
    rows = np.atleast_2d(np.asarray(ids))
    texts = []
    for row in rows.tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      texts.append(self._sp.decode([i for i in row if i != self._sp.pad_id()]))
    return texts

  def tf_encode(self, texts: tf.Tensor, max_len: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`encode` inside tf.data: strings [...] -> (ids int32 [..., L], mask bool [..., L]).

    Runs as a `tf.numpy_function` (Python, holds the GIL): call it on whole batches, and
    consume such pipelines to the end: dropping an iterator while the function runs in a
    tf.data thread can deadlock at exit (mmfusion's pipeline tokenizes with `encode`).
    """
    texts = tf.convert_to_tensor(texts, tf.string)
    flat = tf.reshape(texts, [-1])

    def encode_np(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      return self.encode([t.decode('utf-8') for t in batch], max_len)

    ids, mask = tf.numpy_function(encode_np, [flat], (tf.int32, tf.bool), stateful=False)
    out_shape = tf.concat([tf.shape(texts), [max_len]], axis=0)
    static_shape = texts.shape.concatenate([max_len])
    ids = tf.ensure_shape(tf.reshape(ids, out_shape), static_shape)
    mask = tf.ensure_shape(tf.reshape(mask, out_shape), static_shape)
    return ids, mask
