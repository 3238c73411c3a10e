"""Text to speech for the spoken datasets: eSpeak NG through ctypes, its speakers, their voice
transforms, and a deterministic way to run it.

The engine is eSpeak NG 1.52 as the `espeakng-loader` wheel ships it (`pip install
'mmfusion[speech]'`; GPL-3.0, loaded as a separate shared library at render time only, never
imported by training). Chosen over hibari-tts (one bundled voice: no speaker-disjoint splits)
and piper (one voice, ~0.5 s an utterance): it has ~100 voice variants and eight English
accents, and speaks an utterance in ~2-4 ms, so a dataset of tens of thousands of clips renders
in about a minute.

A speaker is an accent, a voice variant, a base pitch, a pitch range and a speaking rate; every
utterance adds its own small rate and gain jitter and light noise (from numpy, seeded per
utterance). Audio leaves at 16 kHz int16 (eSpeak speaks at 22.05 kHz; resampled by FFT).

Determinism. eSpeak seeds its random numbers from the clock (we seed them per utterance), and
keeps other state between utterances inside the library: the same call twice in one process
gives different samples, even after a re-initialisation, while the same sequence of calls in a
fresh process gives the same bytes. So `synthesize` always
speaks in fresh worker processes (`python -m mmfusion.data.tts`), one per chunk of utterances
whose boundaries depend only on the utterances: the same request gives bit-identical audio, on
any number of workers. Across machines the guarantee is as strong as eSpeak's own arithmetic
(same wheel, same CPU architecture).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import io
import json
import os
import subprocess
import sys
from typing import Sequence

import numpy as np

SAMPLE_RATE = 16_000
_ESPEAK_RATE = 22_050            # eSpeak NG's own output rate for every voice used here
CHUNK = 256                      # utterances per worker process (see the module doc)

# eSpeak's parameter ids (speak_lib.h).
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Speaker:
  """A voice: eSpeak accent + variant, base pitch and range (0..99), rate (words per minute)."""
  name: str
  accent: str
  variant: str
  pitch: int
  pitch_range: int
  rate: int

  @property
  def voice(self) -> str:
    return f'{self.accent}+{self.variant}'


def _speakers() -> tuple[Speaker, ...]:
  """24 speakers: six English accents, male and female variants, each its own pitch, range
  and rate. Welsh-English (gbcwmd) and Caribbean (029) voices are left out: an offline US-English
  recogniser got under 0.6 of their words (tests/test_speech_data.py checks the rest).

  Validation and test speakers are new voices of accents heard in training, as in the usual
  speaker-disjoint splits. An accent never heard in training is a larger shift: with a Caribbean
  test voice (the first split tried) image->speech R@1 on its scenes was 0.56, against 0.76 and
  0.77 for the other two test voices (configs/shapes_trimodal.py, 2026-12-02)."""
  table = [
      ('en-us', 'm1', 40, 50, 190), ('en-us', 'f2', 62, 60, 200), ('en-us', 'm3', 35, 40, 215),
      ('en-gb-x-rp', 'f1', 68, 55, 185), ('en-gb-x-rp', 'm2', 45, 45, 205),
      ('en', 'f3', 60, 70, 210), ('en', 'm4', 38, 35, 180), ('en', 'f5', 66, 50, 225),
      ('en-us-nyc', 'm5', 42, 55, 200), ('en-us-nyc', 'f4', 60, 45, 190),
      ('en-gb-scotland', 'm6', 36, 60, 195), ('en-gb-scotland', 'f1', 64, 40, 215),
      ('en-us', 'm2', 44, 50, 185), ('en-gb-x-rp', 'f2', 58, 65, 205),
      ('en-gb-x-gbclan', 'm3', 48, 45, 220), ('en-gb-x-gbclan', 'f3', 60, 55, 195),
      ('en-us', 'm7', 40, 65, 200), ('en-us', 'f4', 60, 50, 185),
      ('en-us', 'f5', 74, 45, 210), ('en-gb-x-rp', 'm6', 34, 55, 195),
      ('en-us-nyc', 'm1', 50, 40, 230), ('en', 'f1', 56, 60, 190),
      ('en-gb-x-rp', 'm4', 46, 55, 215), ('en-gb-scotland', 'f5', 68, 50, 200),
  ]
  return tuple(Speaker(f'{accent}+{variant}/{pitch}', accent, variant, pitch, rng, rate)
               for accent, variant, pitch, rng, rate in table)


SPEAKERS = _speakers()
# Speaker-disjoint splits: no validation or test voice is ever heard in training.
SPLIT_SPEAKERS = {
    'train': tuple(range(0, 18)),
    'validation': tuple(range(18, 21)),
    'test': tuple(range(21, 24)),
}


@dataclasses.dataclass(frozen=True)
class Utterance:
  """What to say, by whom, and the seed of its jitter and noise."""
  text: str
  speaker: int          # index into SPEAKERS
  seed: int


# ------------------------------------------------------------------------------ the engine


def _library():
  try:
    import espeakng_loader  # noqa: PLC0415  (an optional dependency: the [speech] extra)
  except ImportError:
    raise ImportError("speaking the spoken datasets needs eSpeak NG: pip install "
                      "'mmfusion[speech]' (or espeakng-loader)") from None
  return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


class _Engine:
  """eSpeak NG in synchronous mode: `speak(text, speaker, rate)` -> int16 at 22.05 kHz."""

  def __init__(self):
    library, data = _library()
    self._lib = ctypes.CDLL(library)
    self._chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                     ctypes.c_void_p)
    self._callback = callback_type(self._collect)    # kept alive as long as the engine
    rate = self._lib.espeak_Initialize(2, 0, data.encode(), 0)   # 2 = AUDIO_OUTPUT_SYNCHRONOUS
    if rate != _ESPEAK_RATE:
      raise RuntimeError(f'eSpeak NG initialised at {rate} Hz; expected {_ESPEAK_RATE}')
    self._lib.espeak_SetSynthCallback(self._callback)

  def _collect(self, wav, num_samples, events) -> int:
    del events
    if num_samples > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
    return 0

  def speak(self, text: str, speaker: Speaker, rate: int, seed: int) -> np.ndarray:
    if self._lib.espeak_SetVoiceByName(speaker.voice.encode()) != 0:
      raise ValueError(f'eSpeak NG has no voice {speaker.voice!r}')
    # eSpeak seeds its own random numbers (voice jitter) from the clock at start-up: two runs a
    # second apart spoke differently. Seeded per utterance, they depend on the request alone.
    self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
    for parameter, value in ((_RATE, rate), (_PITCH, speaker.pitch),
                             (_RANGE, speaker.pitch_range), (_VOLUME, 100)):
      self._lib.espeak_SetParameter(parameter, value, 0)
    self._chunks.clear()
    encoded = text.encode()
    status = self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, 1, 0, 0, None, None)
    self._lib.espeak_Synchronize()
    if status != 0 or not self._chunks:
      raise RuntimeError(f'eSpeak NG could not speak {text!r} as {speaker.voice} '
                         f'(status {status})')
    return np.concatenate(self._chunks)


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Band-limited resampling by FFT (float64 in, float64 out); exact for periodic signals."""
  num_out = int(round(len(wave) * rate_out / rate_in))
  spectrum = np.fft.rfft(wave)[:num_out // 2 + 1]
  return np.fft.irfft(spectrum, num_out) * (num_out / len(wave))


def _trim(wave: np.ndarray, threshold: float = 0.01, margin: int = 800) -> np.ndarray:
  """Leading and trailing silence cut to `margin` samples (50 ms at 16 kHz)."""
  loud = np.nonzero(np.abs(wave) > threshold * np.abs(wave).max())[0]
  if not len(loud):
    return wave
  return wave[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def _voice(engine: _Engine, utterance: Utterance) -> np.ndarray:
  """One utterance at 16 kHz int16: the speaker's voice with this utterance's jitter and noise."""
  speaker = SPEAKERS[utterance.speaker]
  rng = np.random.default_rng(utterance.seed)
  rate = int(round(speaker.rate * rng.uniform(0.92, 1.08)))
  raw = engine.speak(utterance.text, speaker, rate, utterance.seed).astype(np.float64) / 32768.0
  wave = _trim(resample(raw, _ESPEAK_RATE, SAMPLE_RATE))
  wave *= rng.uniform(0.3, 0.8) / max(np.abs(wave).max(), 1e-9)       # peak level
  snr_db = rng.uniform(25.0, 40.0)                                   # light background noise
  noise = rng.normal(0.0, 1.0, len(wave)) * np.sqrt(np.mean(wave ** 2) / 10 ** (snr_db / 10))
  return np.clip(np.round((wave + noise) * 32767.0), -32768, 32767).astype(np.int16)


# ------------------------------------------------------------------- fresh-process workers


def _worker_main() -> None:
  """`python -m mmfusion.data.tts`: utterances as JSON lines on stdin -> .npz on stdout."""
  engine = _Engine()
  clips = [_voice(engine, Utterance(**json.loads(line))) for line in sys.stdin if line.strip()]
  buffer = io.BytesIO()
  np.savez(buffer, lengths=np.array([len(c) for c in clips], np.int64),
           samples=np.concatenate(clips) if clips else np.zeros(0, np.int16))
  sys.stdout.buffer.write(buffer.getvalue())


def _speak_chunk(chunk: Sequence[Utterance]) -> list[np.ndarray]:
  request = ''.join(json.dumps(dataclasses.asdict(u)) + '\n' for u in chunk)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
      os.environ.get('PYTHONPATH')])))
  run = subprocess.run([sys.executable, os.path.abspath(__file__)], input=request.encode(),
                       capture_output=True, env=env, check=False)
  if run.returncode:
    raise RuntimeError(f'the speech worker failed:\n{run.stderr.decode()[-2000:]}')
  with np.load(io.BytesIO(run.stdout)) as out:
    return np.split(out['samples'], np.cumsum(out['lengths'])[:-1])


def synthesize(utterances: Sequence[Utterance], workers: int | None = None):
  """Yields each utterance's audio (int16 [samples] at SAMPLE_RATE), in order.

  Chunks of CHUNK utterances are spoken in fresh processes, `workers` at a time (default: one
  per CPU): the result depends only on `utterances`.
  """
  for u in utterances:
    if not 0 <= u.speaker < len(SPEAKERS):
      raise ValueError(f'speaker {u.speaker} is not one of the {len(SPEAKERS)} speakers')
  _library()                      # a missing engine fails here, with the install hint
  chunks = [utterances[i:i + CHUNK] for i in range(0, len(utterances), CHUNK)]
  workers = workers or min(os.cpu_count() or 1, 8)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # At most 2 x workers chunks in flight: memory stays bounded on long renders.
    pending = [pool.submit(_speak_chunk, c) for c in chunks[:2 * workers]]
    for next_chunk in range(2 * workers, len(chunks) + 2 * workers):
      yield from pending.pop(0).result()
      if next_chunk < len(chunks):
        pending.append(pool.submit(_speak_chunk, chunks[next_chunk]))


if __name__ == '__main__':
  _worker_main()
