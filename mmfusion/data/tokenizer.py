"""Tokenization: train a sentencepiece model from captions, or load any sentencepiece `.model`
or Hugging Face `tokenizer.json` (CLIP's BPE, through the `tokenizers` library), and turn texts
into fixed-length id/mask arrays (numpy, or inside tf.data). `load` picks by the file name.

Conventions of the models `train_tokenizer` writes: pad_id=0, unk_id=1, bos_id=2,
eos_id=3. `encode` appends EOS to every text, truncates to `max_len` keeping EOS as the
last token, and pads with the pad id; `mask` is True on real tokens, EOS included, so a
text tower can pool at the last True position (the EOS).

Any other sentencepiece model works if it has an EOS piece. Many have no pad piece
(pad_id -1): their texts are padded with id 0 and only `mask` tells padding apart. A
`tokenizer.json` brings its own special tokens (CLIP: <|startoftext|> ... <|endoftext|>, added by
its post-processor); its EOS is the last id it adds to every text.

Weights trained elsewhere may pad differently: `pad_id` overrides the id padding holds, and
`attend_padding` makes the mask True everywhere (SigLIP's text tower attends to its padding and
pools at the last position).
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from mmfusion.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID  # noqa: F401 (re-exported)
from mmfusion.data.tf_lazy import tf  # imported at first use


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


class _FixedLength:
  """Fixed-length encoding shared by every backend: `_ids(texts)` gives each text's ids, EOS
  last; `encode` truncates (keeping EOS last) and pads."""

  def __init__(self, model_path: str, pad_id: int | None, attend_padding: bool):
    self.model_path = model_path
    self._pad_override = pad_id
    self.attend_padding = attend_padding

  def _ids(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def eos_id(self) -> int:
    raise NotImplementedError

  @property
  def _own_pad_id(self) -> int:
    return 0

  @property
  def pad_id(self) -> int:
    """The id padding positions hold: the override, else the model's pad id (0 if none)."""
    return self._own_pad_id if self._pad_override is None else self._pad_override

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [N, max_len], mask bool [N, max_len]); see the module doc."""
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}')
    rows = self._ids(list(texts))
    ids = np.full((len(rows), max_len), self.pad_id, np.int32)
    lengths = np.empty(len(rows), np.int32)
    for i, row in enumerate(rows):
      if len(row) > max_len:
        row = row[:max_len - 1] + [self.eos_id]
      ids[i, :len(row)] = row
      lengths[i] = len(row)
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    if self.attend_padding:
      mask = np.ones_like(mask)
    return ids, mask

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

  def _until_eos(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[list[int]]:
    rows = np.atleast_2d(np.asarray(ids)).tolist()
    return [row[:row.index(self.eos_id)] if self.eos_id in row else row for row in rows]


class Tokenizer(_FixedLength):
  """A sentencepiece model with mmfusion's fixed-length encode/decode conventions."""

  def __init__(self, model_path: str, pad_id: int | None = None, attend_padding: bool = False):
    super().__init__(model_path, pad_id, attend_padding)
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
  def _own_pad_id(self) -> int:
    return max(self._sp.pad_id(), 0)

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def _ids(self, texts):
    return [p + [self.eos_id] for p in self._sp.encode(list(texts))]

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """One row of ids -> its sentencepiece pieces ('▁red', '</s>'): labels for per-token plots."""
    return [self._sp.id_to_piece(int(i)) for i in ids]

  def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    """ids [N, L] (or one row [L]) -> N texts; each stops at its first EOS."""
    return [self._sp.decode([i for i in row if i != self._sp.pad_id()])
            for row in self._until_eos(ids)]


class HFTokenizer(_FixedLength):
  """A Hugging Face `tokenizer.json` (e.g. CLIP's byte-level BPE) through the `tokenizers`
  library: its normaliser, pre-tokeniser and post-processor (which adds the special tokens)
  are the file's own."""

  def __init__(self, model_path: str, pad_id: int | None = None, attend_padding: bool = False):
    super().__init__(model_path, pad_id, attend_padding)
    try:
      import tokenizers
    except ImportError:
      raise ImportError(f'{model_path} is a Hugging Face tokenizer: pip install tokenizers '
                        "(mmfusion's [weights] extra)") from None
    if not tf.io.gfile.exists(model_path):
      raise FileNotFoundError(f'tokenizer file not found: {model_path}')
    try:
      with tf.io.gfile.GFile(model_path, 'r') as f:
        self._tok = tokenizers.Tokenizer.from_str(f.read())
    except Exception as e:       # the library raises its own exception types for a bad file
      raise ValueError(f'not a readable tokenizer.json: {model_path} ({e})') from e
    self._tok.no_truncation()
    self._tok.no_padding()
    added = self._tok.encode('').ids
    if not added:
      raise ValueError(f'{model_path} adds no end token to a text; mmfusion pools the text '
                       'tower at the last real token, which must be one.')
    self._eos = added[-1]

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def eos_id(self) -> int:
    return self._eos

  def _ids(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts))]

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self._tok.id_to_token(int(i)) or '' for i in ids]

  def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    """ids [N, L] (or one row [L]) -> N texts; each stops at its first EOS."""
    texts = self._tok.decode_batch(self._until_eos(ids), skip_special_tokens=True)
    # CLIP's BPE marks word ends with a suffix ('</w>') that its byte-level decoder keeps.
    suffix = getattr(self._tok.model, 'end_of_word_suffix', None)
    return [' '.join(t.replace(suffix, ' ').split()) if suffix else t for t in texts]


def load(model_path: str, pad_id: int | None = None, attend_padding: bool = False
         ) -> Tokenizer | HFTokenizer:
  """The tokenizer in `model_path`: a `.json` file is a Hugging Face tokenizer, anything else
  a sentencepiece model."""
  cls = HFTokenizer if model_path.endswith('.json') else Tokenizer
  return cls(model_path, pad_id=pad_id, attend_padding=attend_padding)
