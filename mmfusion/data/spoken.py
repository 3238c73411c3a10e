"""The spoken shapes (`mmfusion_shapes/spoken`): each rendered scene with one of its captions and
one of its questions spoken aloud, by speakers that differ between the splits.

It owns what the spoken configs add to the embedded dataset: the features, which caption and
question are spoken by whom, and speaking them (data/tts.py). The scenes, captions and questions
are those of data/shapes.py for the same seed, split and index; what is spoken is drawn from its
own generator, `default_rng([seed, split_id, index, 1])`, so the choice never moves the scene.

Features added:
  speech                  int16 [samples] at 16 kHz: the scene's full description, its first
                          caption (sizes, colours, shapes, and the position or the relation),
                          as a person describing the picture aloud would say it
  speech_text             the caption it says
  spoken_question         int16 [samples]: one of the scene's questions
  spoken_question_index   which one (its answer is answers[spoken_question_index])
  speaker                 ClassLabel over tts.SPEAKERS; a split only has its own speakers
                          (tts.SPLIT_SPEAKERS), so test voices are never heard in training
The longest clip of each feature is recorded in the dataset's metadata (`longest_clip_seconds`),
which lets a run refuse a too-short audio budget before it reads anything.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from mmfusion.data import tts

AUDIO_FEATURES = ('speech', 'spoken_question')
_BLOCK = 1024          # scenes rendered, then spoken, at a time (bounds memory on long splits)


class PcmAudio(tfds.features.Audio):
  """A waveform stored as raw little-endian PCM bytes, 2 per int16 sample. TFDS's Audio stores
  int16 arrays as tf.train.Example int64 varints (10 bytes for every negative sample) and
  ignores encoding='bytes' for arrays; this honours it."""

  def __init__(self, sample_rate: int):
    super().__init__(shape=(None,), dtype=np.int16, sample_rate=sample_rate, encoding='bytes')

  def encode_example(self, audio: np.ndarray) -> bytes:
    return tfds.features.Tensor.encode_example(self, np.asarray(audio, np.int16))


def features() -> dict[str, Any]:
  audio = lambda: PcmAudio(tts.SAMPLE_RATE)  # noqa: E731
  return {
      'speech': audio(),
      'speech_text': tfds.features.Text(),
      'spoken_question': audio(),
      'spoken_question_index': tfds.features.Scalar(np.int32),
      'speaker': tfds.features.ClassLabel(names=[s.name for s in tts.SPEAKERS]),
  }


def _choices(seed: int, split_id: int, index: int, split: str,
             example: dict[str, Any]) -> dict[str, Any]:
  rng = np.random.default_rng([seed, split_id, index, 1])
  speakers = tts.SPLIT_SPEAKERS[split]
  caption = 0     # the full description (see the module doc)
  question = int(rng.integers(len(example['questions'])))
  speaker = int(speakers[rng.integers(len(speakers))])
  jitter_seeds = rng.integers(2**31, size=2)
  return dict(caption=caption, question=question, speaker=speaker,
              utterances=[tts.Utterance(example['captions'][caption], speaker,
                                        int(jitter_seeds[0])),
                          tts.Utterance(example['questions'][question], speaker,
                                        int(jitter_seeds[1]))])


def add_speech(examples: Iterator[tuple[int, dict[str, Any]]], seed: int, split_id: int,
               split: str, longest: dict[str, float]) -> Iterator[tuple[int, dict[str, Any]]]:
  """(index, example) of data/shapes.py -> the same with the spoken features, in order.

  `longest` is updated with the longest clip (seconds) of each audio feature seen.
  """
  def speak(block):
    choices = [_choices(seed, split_id, index, split, ex) for index, ex in block]
    clips = tts.synthesize([u for c in choices for u in c['utterances']])
    for (index, ex), choice in zip(block, choices):
      ex.update(speech=next(clips), speech_text=ex['captions'][choice['caption']],
                spoken_question=next(clips), spoken_question_index=choice['question'],
                speaker=choice['speaker'])
      for feature in AUDIO_FEATURES:
        longest[feature] = max(longest.get(feature, 0.0), len(ex[feature]) / tts.SAMPLE_RATE)
      yield index, ex

  block = []
  for item in examples:
    block.append(item)
    if len(block) == _BLOCK:
      yield from speak(block)
      block = []
  if block:
    yield from speak(block)
