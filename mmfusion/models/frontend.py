"""Speech front-end on device: waveform [B,S] -> log-mel or MFCC frames [B,T,F] with a frame mask,
per-utterance normalisation and SpecAugment. Pure jnp in float32, equal to tf.signal's
stft / linear_to_mel_weight_matrix / mfccs_from_log_mel_spectrograms (the tests check it).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmfusion.models import layers

Array = jax.Array

FEATURES = ('log_mel', 'mfcc')
# The front-end's matmuls are tiny; full float32 keeps it equal to the reference on every
# backend (GPUs would otherwise use TF32 and TPUs bfloat16 passes for float32 dots).
_HIGHEST = jax.lax.Precision.HIGHEST
_STD_FLOOR = 1e-5


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class FrontendOptions:
  """How a waveform becomes features. Frames are frame_ms long every hop_ms, with no end padding
  (tf.signal.stft's pad_end=False); masks count frames in time and feature bins in frequency."""
  sample_rate: int = 16000
  features: str = 'log_mel'        # one of FEATURES
  frame_ms: float = 25.0
  hop_ms: float = 10.0
  fft_size: int = 512
  num_mel_bins: int = 40
  lower_hz: float = 20.0
  upper_hz: float = 7600.0
  num_mfcc: int = 13               # features='mfcc' keeps the first num_mfcc DCT coefficients
  log_floor: float = 1e-6          # log(max(mel energy, log_floor)): silence stays finite
  normalize: bool = True           # per utterance and feature, over the real frames
  time_masks: int = 2              # SpecAugment, in training only
  time_mask_max: int = 10          # frames
  freq_masks: int = 2
  freq_mask_max: int = 6           # feature bins

  def __post_init__(self):
    def need(ok: bool, field: str, why: str):
      if not ok:
        raise ValueError(f'{field}={getattr(self, field)!r} {why}')

    need(self.features in FEATURES, 'features', f'is unknown; expected one of {FEATURES}')
    for field in ('sample_rate', 'fft_size', 'num_mel_bins', 'num_mfcc'):
      need(_is_int(getattr(self, field)) and getattr(self, field) > 0, field,
           'must be a positive integer')
    for field in ('time_masks', 'time_mask_max', 'freq_masks', 'freq_mask_max'):
      need(_is_int(getattr(self, field)) and getattr(self, field) >= 0, field,
           'must be an integer >= 0')
    for field in ('frame_ms', 'hop_ms', 'log_floor'):
      need(getattr(self, field) > 0, field, 'must be positive')
    need(self.frame_length > 0, 'frame_ms', f'is under one sample at {self.sample_rate} Hz')
    need(self.hop_length > 0, 'hop_ms', f'is under one sample at {self.sample_rate} Hz')
    need(self.fft_size >= self.frame_length, 'fft_size',
         f'must be >= the frame length, {self.frame_length} samples (frame_ms={self.frame_ms} '
         f'at {self.sample_rate} Hz)')
    need(0 <= self.lower_hz < self.upper_hz, 'lower_hz',
         f'must be >= 0 and below upper_hz={self.upper_hz}')
    need(self.upper_hz <= self.sample_rate / 2, 'upper_hz',
         f'must be <= the Nyquist frequency, {self.sample_rate / 2} Hz')
    need(self.num_mfcc <= self.num_mel_bins, 'num_mfcc',
         f'must be <= num_mel_bins={self.num_mel_bins}')
    need(self.freq_mask_max <= self.num_features, 'freq_mask_max',
         f'must be <= the number of feature bins, {self.num_features}')

  @property
  def frame_length(self) -> int:
    return round(self.sample_rate * self.frame_ms / 1000)

  @property
  def hop_length(self) -> int:
    return round(self.sample_rate * self.hop_ms / 1000)

  @property
  def num_features(self) -> int:
    return self.num_mel_bins if self.features == 'log_mel' else self.num_mfcc

  def num_frames(self, num_samples: int) -> int:
    if num_samples < self.frame_length:
      raise ValueError(f'{num_samples} samples are shorter than one frame ({self.frame_length} '
                       f'samples = frame_ms {self.frame_ms} at {self.sample_rate} Hz)')
    return 1 + (num_samples - self.frame_length) // self.hop_length


def _hertz_to_mel(hz):
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)   # HTK, as tf.signal


@functools.cache
def mel_matrix(opts: FrontendOptions) -> np.ndarray:
  """[fft_size//2 + 1, num_mel_bins] float32 triangular filters, linear in mel (HTK): what
  tf.signal.linear_to_mel_weight_matrix gives, including its zeroed DC row. Read-only."""
  num_bins = opts.fft_size // 2 + 1
  bins_mel_k1 = _hertz_to_mel(np.linspace(0.0, opts.sample_rate / 2, num_bins))[1:, None]
  edges_mel = np.linspace(_hertz_to_mel(opts.lower_hz), _hertz_to_mel(opts.upper_hz),
                          opts.num_mel_bins + 2)
  lower_1m, center_1m, upper_1m = (edges_mel[None, i:i + opts.num_mel_bins] for i in range(3))
  rising_km = (bins_mel_k1 - lower_1m) / (center_1m - lower_1m)
  falling_km = (upper_1m - bins_mel_k1) / (upper_1m - center_1m)
  weights_km = np.maximum(0.0, np.minimum(rising_km, falling_km))
  weights_km = np.concatenate([np.zeros((1, opts.num_mel_bins)), weights_km]).astype(np.float32)
  weights_km.setflags(write=False)
  return weights_km


def hann_window(length: int) -> np.ndarray:
  """tf.signal.hann_window(length) (periodic=True): periodic for an even length, but, as in TF,
  symmetric for an odd one."""
  if length == 1:
    return np.ones(1, np.float32)
  period = length if length % 2 == 0 else length - 1
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / period)).astype(np.float32)


def _frames(waveform_bs: Array, opts: FrontendOptions) -> Array:
  """[B,T,frame_length] overlapping frames, by reshapes and slices rather than a gather: the
  signal cut into hop-long chunks, k = ceil(frame/hop) consecutive chunks side by side."""
  batch, num_samples = waveform_bs.shape
  length, hop = opts.frame_length, opts.hop_length
  num_frames = opts.num_frames(num_samples)
  k = -(-length // hop)
  needed = (num_frames + k - 1) * hop
  # The zeros appended (or the tail dropped) lie beyond every frame's end: `[..., :length]` cuts
  # them off again.
  x_bs = jnp.pad(waveform_bs, ((0, 0), (0, max(needed - num_samples, 0))))[:, :needed]
  chunks_bch = x_bs.reshape(batch, num_frames + k - 1, hop)
  frames_btk = jnp.concatenate([chunks_bch[:, j:j + num_frames] for j in range(k)], axis=-1)
  return frames_btk[..., :length]


def magnitude_spectrogram(waveform_bs: Array, opts: FrontendOptions) -> Array:
  """|STFT| [B, T, fft_size//2 + 1] float32: Hann-windowed frames, zero-padded to fft_size."""
  frames_btl = _frames(jnp.asarray(waveform_bs, jnp.float32), opts)
  frames_btl = frames_btl * jnp.asarray(hann_window(opts.frame_length))
  return jnp.abs(jnp.fft.rfft(frames_btl, n=opts.fft_size, axis=-1))


def log_mel(waveform_bs: Array, opts: FrontendOptions) -> Array:
  """[B, T, num_mel_bins] float32: log(max(|STFT| . mel_matrix, log_floor))."""
  mel_btm = jnp.matmul(magnitude_spectrogram(waveform_bs, opts), jnp.asarray(mel_matrix(opts)),
                       precision=_HIGHEST)
  return jnp.log(jnp.maximum(mel_btm, opts.log_floor))


@functools.cache
def _dct_matrix(num_mel_bins: int, num_mfcc: int) -> np.ndarray:
  """[M, num_mfcc]: TF's unnormalised DCT-II (2 sum_n x_n cos(pi k (2n+1) / 2M)) times
  1/sqrt(2M), the scaling of tf.signal.mfccs_from_log_mel_spectrograms."""
  n_m1 = np.arange(num_mel_bins)[:, None]
  k_1c = np.arange(num_mfcc)[None, :]
  basis = 2.0 * np.cos(np.pi * k_1c * (2 * n_m1 + 1) / (2 * num_mel_bins))
  return (basis / math.sqrt(2 * num_mel_bins)).astype(np.float32)


def mfcc(log_mel_btm: Array, num_mfcc: int) -> Array:
  """The first num_mfcc MFCCs [B, T, num_mfcc] of log-mel frames, as tf.signal computes them."""
  num_mel_bins = log_mel_btm.shape[-1]
  if not 0 < num_mfcc <= num_mel_bins:
    raise ValueError(f'num_mfcc={num_mfcc} must be in [1, {num_mel_bins}] (the mel bins)')
  return jnp.matmul(log_mel_btm.astype(jnp.float32),
                    jnp.asarray(_dct_matrix(num_mel_bins, num_mfcc)), precision=_HIGHEST)


def features(waveform_bs: Array, opts: FrontendOptions) -> Array:
  """[B, T, opts.num_features] float32: log-mel or MFCC, by opts.features."""
  log_mel_btm = log_mel(waveform_bs, opts)
  return log_mel_btm if opts.features == 'log_mel' else mfcc(log_mel_btm, opts.num_mfcc)


def frame_mask(sample_mask_bs: Array, opts: FrontendOptions) -> Array:
  """[B, T] bool: frame t is real iff it starts inside the real audio (t * hop < the number of
  real samples; the sample mask is a prefix of Trues). A prefix of Trues too."""
  num_real_b1 = jnp.sum(sample_mask_bs.astype(jnp.int32), axis=1, keepdims=True)
  starts_1t = jnp.arange(opts.num_frames(sample_mask_bs.shape[1]))[None] * opts.hop_length
  return starts_1t < num_real_b1


def normalize(features_btf: Array, frame_mask_bt: Array) -> Array:
  """Per utterance and feature: zero mean, unit std over the real frames; padded frames are
  exactly 0. The std is floored, so a constant feature or an all-padding row gives 0, not NaN."""
  real_bt1 = frame_mask_bt[:, :, None]
  x_btf = jnp.where(real_bt1, features_btf.astype(jnp.float32), 0.0)
  count_b11 = jnp.maximum(jnp.sum(real_bt1.astype(jnp.float32), axis=1, keepdims=True), 1.0)
  mean_b1f = jnp.sum(x_btf, axis=1, keepdims=True) / count_b11
  centred_btf = jnp.where(real_bt1, x_btf - mean_b1f, 0.0)
  var_b1f = jnp.sum(centred_btf * centred_btf, axis=1, keepdims=True) / count_b11
  return centred_btf / jnp.maximum(jnp.sqrt(var_b1f), _STD_FLOOR)


def _bands(key: Array, shape: tuple[int, int], max_width: int, num_starts: Array,
           size: int) -> Array:
  """[B, n, size] bool: n bands per example, width uniform in [0, max_width], start uniform in
  [0, max(num_starts - width, 0)] (num_starts [B,1]: the positions a band may cover)."""
  width_key, start_key = jax.random.split(key)
  width_bn = jax.random.randint(width_key, shape, 0, max_width + 1)
  start_bn = jax.random.randint(start_key, shape, 0, jnp.maximum(num_starts - width_bn, 0) + 1)
  pos_11s = jnp.arange(size)[None, None]
  return (pos_11s >= start_bn[..., None]) & (pos_11s < (start_bn + width_bn)[..., None])


def spec_augment(features_btf: Array, frame_mask_bt: Array, rng: Array,
                 opts: FrontendOptions) -> Array:
  """SpecAugment's time and frequency masks (no time warp), independent per example: each band
  of frames or feature bins is set to 0 (the mean, after normalisation). A time band starts
  inside the real frames; no mask ever changes a padded frame."""
  batch, num_frames, num_features = features_btf.shape
  time_key, freq_key = jax.random.split(rng)
  num_real_b1 = jnp.sum(frame_mask_bt.astype(jnp.int32), axis=1, keepdims=True)
  time_bnt = _bands(time_key, (batch, opts.time_masks), opts.time_mask_max, num_real_b1,
                    num_frames)
  freq_bnf = _bands(freq_key, (batch, opts.freq_masks), opts.freq_mask_max,
                    jnp.full((batch, 1), num_features), num_features)
  masked_btf = jnp.any(time_bnt, axis=1)[:, :, None] | jnp.any(freq_bnf, axis=1)[:, None, :]
  masked_btf &= frame_mask_bt[:, :, None]
  return jnp.where(masked_btf, 0.0, features_btf).astype(features_btf.dtype)


class Frontend(nn.Module):
  """Waveform [B,S] (+ sample mask) -> (features [B,T,F] float32, frame mask [B,T] bool).

  Padded samples are zeroed first, so their content cannot reach any output. In training, with
  masks configured, SpecAugment draws from the 'augment' rng stream. No params.
  """
  options: FrontendOptions

  @nn.compact
  def __call__(self, waveform_bs: Array, mask_bs: Array | None = None, *,
               train: bool = False) -> tuple[Array, Array]:
    opts = self.options
    if waveform_bs.ndim != 2:
      raise ValueError(f'the audio front-end takes waveforms [batch, samples]; got shape '
                       f'{waveform_bs.shape}')
    if mask_bs is None:
      mask_bs = jnp.ones(waveform_bs.shape, jnp.bool_)
    elif mask_bs.shape != waveform_bs.shape:
      raise ValueError(f'audio mask shape {mask_bs.shape} != waveform shape {waveform_bs.shape}')
    mask_bs = mask_bs.astype(jnp.bool_)
    # `where`, not a product: NaN or inf in the padding would survive a multiplication by 0.
    waveform_bs = jnp.where(mask_bs, waveform_bs.astype(jnp.float32), 0.0)
    features_btf = features(waveform_bs, opts)
    frame_mask_bt = frame_mask(mask_bs, opts)
    if opts.normalize:
      features_btf = normalize(features_btf, frame_mask_bt)
    masks = (opts.time_masks and opts.time_mask_max) or (opts.freq_masks and opts.freq_mask_max)
    if train and masks:
      features_btf = spec_augment(features_btf, frame_mask_bt, self.make_rng('augment'), opts)
    return layers.constrain(features_btf, ('batch', 'length', None)), frame_mask_bt
