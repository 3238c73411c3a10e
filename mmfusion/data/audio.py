"""The audio modality's preprocessing, shared by training, evaluation and the public API: int16
PCM clips -> float waveforms in [-1, 1], zero-padded to a fixed length with a mask; registered
as op 'audio' (spoken captions) and op 'spoken_question' (spoken VQA questions).

Features are computed on device by the audio tower (models/frontend.py), so the host only
pads. A clip longer than config.data.audio_max_seconds, or a dataset whose sample rate is not
config.data.audio_sample_rate, is refused when the op is built, from the dataset's metadata
(data/spoken.py records its longest clip), before anything is read; a clip that still turns up
too long (a dataset without that metadata) stops the input pipeline with a message naming it.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from mmfusion.data import ops
from mmfusion.data import text
from mmfusion.data.tf_lazy import tf, tfds  # imported at first use


def pad_clip(clip: tf.Tensor, num_samples: int, where: str) -> dict[str, tf.Tensor]:
  """int16 (or float) [n] -> float32 [num_samples] in [-1, 1], zero after n, and its mask."""
  length = tf.shape(clip)[0]
  check = tf.debugging.assert_less_equal(
      length, num_samples, message=f'{where}: an audio clip is longer than '
      f'config.data.audio_max_seconds allows ({num_samples} samples); raise it')
  with tf.control_dependencies([check]):
    wave = tf.cast(clip, tf.float32)
  if clip.dtype == tf.int16:
    wave = wave / 32768.0
  wave = tf.pad(wave, [[0, num_samples - length]])
  mask = tf.sequence_mask(length, num_samples)
  return {'wave': tf.ensure_shape(wave, [num_samples]),
          'mask': tf.ensure_shape(mask, [num_samples])}


class _ClipOp(ops.Op):
  """One audio clip per example -> `<name>` float32 [B, S], `<name>_mask` bool [B, S],
  S = audio_max_seconds x audio_sample_rate."""
  feature = ''

  def features(self):
    return (self.feature,)

  @property
  def num_samples(self) -> int:
    return int(round(self.config.data.audio_max_seconds * self.config.data.audio_sample_rate))

  def check(self):
    super().check()
    feature = self.source.features[self.feature]
    where = f'dataset {self.source.where}, feature {self.feature!r}'
    if not isinstance(feature, tfds.features.Audio):
      raise ValueError(f'{where}: input {self.name!r} reads an Audio feature; it is {feature!r}.')
    rate = self.config.data.audio_sample_rate
    if feature.sample_rate is not None and feature.sample_rate != rate:
      raise ValueError(f'{where} is sampled at {feature.sample_rate} Hz, but '
                       f'config.data.audio_sample_rate = {rate}: set it to {feature.sample_rate} '
                       '(and the audio tower\'s sample_rate with it).')
    longest = dict(self.source.builder.info.metadata or {}).get('longest_clip_seconds', {})
    limit = self.config.data.audio_max_seconds
    for split, per_feature in sorted(longest.items()):
      seconds = per_feature.get(self.feature, 0.0)
      if seconds > limit:
        raise ValueError(f'{where}: split {split!r} has clips of up to {seconds:.2f} s, longer '
                         f'than config.data.audio_max_seconds = {limit}; raise it to at least '
                         f'{np.ceil(seconds * 10) / 10:.1f}.')

  def spec(self, batch_size):
    shape = (batch_size, self.num_samples)
    return {self.name: (shape, np.float32), f'{self.name}_mask': (shape, np.bool_)}

  def bytes_per_example(self):
    return self.num_samples * 5                  # float32 wave + bool mask

  def standardize(self, ex):
    return {self.name: ex[self.feature]}

  def decode(self, ex):
    padded = pad_clip(ex[self.name], self.num_samples, f'input {self.name!r}')
    return {self.name: padded['wave'], f'{self.name}_mask': padded['mask']}

  def from_raw(self, values: Sequence[Any]) -> dict[str, np.ndarray]:
    """Waveforms (float in [-1, 1] or int16, at audio_sample_rate), or strings, which are spoken
    by the test split's speakers in turn (data/tts.py; needs the [speech] extra)."""
    if isinstance(values, (str, np.ndarray)) and np.ndim(values) < 2:
      raise ValueError(f'{self.name}: expected a sequence of waveforms or strings, got one')
    values = list(values)
    if values and all(isinstance(v, str) for v in values):
      values = speak(values)
    waves, masks = [], []
    for value in values:
      clip = np.asarray(value)
      if clip.ndim != 1:
        raise ValueError(f'{self.name}: a waveform must be 1-D [samples]; got shape {clip.shape}')
      if clip.shape[0] > self.num_samples:
        raise ValueError(f'{self.name}: a clip of {clip.shape[0]} samples is longer than '
                         f'config.data.audio_max_seconds allows ({self.num_samples} at '
                         f'{self.config.data.audio_sample_rate} Hz).')
      clip = clip.astype(np.float32) / 32768.0 if clip.dtype == np.int16 else clip.astype(
          np.float32)
      waves.append(np.pad(clip, (0, self.num_samples - len(clip))))
      masks.append(np.arange(self.num_samples) < len(clip))
    return {self.name: np.stack(waves), f'{self.name}_mask': np.stack(masks)}


def speak(texts: Sequence[str]) -> list[np.ndarray]:
  """Strings -> int16 clips, the i-th spoken by the (i mod n)-th test speaker (never heard in
  training), each with a seed of its own: the same list gives the same audio."""
  from mmfusion.data import tts   # noqa: PLC0415  (the [speech] extra)
  speakers = tts.SPLIT_SPEAKERS['test']
  return list(tts.synthesize([tts.Utterance(t, speakers[i % len(speakers)], i)
                              for i, t in enumerate(texts)]))


@ops.register
class AudioOp(_ClipOp):
  """Feature `speech` (a spoken caption) -> audio float32 [B, S] and audio_mask bool [B, S]."""
  name = 'audio'
  feature = 'speech'


@ops.register
class SpokenQuestionOp(_ClipOp):
  """Features `spoken_question`, `spoken_question_index` and `answers` -> question float32
  [B, S], question_mask bool [B, S] and answer int32 [B] (its index in the answer vocabulary,
  -1 outside it); in evaluation with a questions axis of 1 ([B, 1, S], [B, 1]), as the VQA
  evaluator reads op 'question's Q questions per example."""
  name = 'spoken_question'
  feature = 'spoken_question'

  def features(self):
    return ('spoken_question', 'spoken_question_index', 'answers')

  def keys(self):
    return ('question', 'question_mask', 'answer')

  def spec(self, batch_size):
    shape = (batch_size, self.num_samples)
    return {'question': (shape, np.float32), 'question_mask': (shape, np.bool_),
            'answer': ((batch_size,), np.int32)}

  @functools.cached_property
  def _written(self) -> text.QuestionOp:
    # The written questions' op numbers the answers (both ops alike). Its own instance, not the
    # Source's shared one: the lookup table it holds lives in the graph of the first input
    # pipeline that uses it, and every pipeline builds its own ops.
    return text.QuestionOp(self.source)

  def standardize(self, ex):
    answer = tf.gather(tf.reshape(ex['answers'], [-1]), ex['spoken_question_index'])
    return {'question': ex['spoken_question'],
            'answer': self._written.answer_table.lookup(answer)}

  def decode(self, ex):
    padded = pad_clip(ex['question'], self.num_samples, f'input {self.name!r}')
    return {'question': padded['wave'], 'question_mask': padded['mask']}

  def eval(self, batch):
    return {k: batch[k][:, None] for k in ('question', 'question_mask', 'answer')}

  def from_raw(self, values):
    out = super().from_raw(values)
    return {'question': out[self.name], 'question_mask': out[f'{self.name}_mask']}
