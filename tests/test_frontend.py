"""The speech front-end (mmfusion/models/frontend.py): STFT, mel filters, log-mel and MFCC against
tf.signal; the frame mask and normalisation by hand; SpecAugment's statistics against exact
expectations counted in numpy; option validation.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mmfusion.models import frontend as fe

# The second config has an odd frame length (201 samples), where tf.signal.hann_window's
# "periodic" window is the symmetric one.
CONFIGS = {
    'default': fe.FrontendOptions(),
    'narrowband': fe.FrontendOptions(sample_rate=8000, frame_ms=25.125, hop_ms=12.5,
                                     fft_size=256, num_mel_bins=24, lower_hz=125.0,
                                     upper_hz=3800.0, num_mfcc=20),
}


def tf_features(waveform_bs: np.ndarray, opts: fe.FrontendOptions):
  """(|STFT|, log-mel, MFCC) by tf.signal, the reference."""
  magnitude = tf.abs(tf.signal.stft(waveform_bs, opts.frame_length, opts.hop_length,
                                    opts.fft_size, window_fn=tf.signal.hann_window,
                                    pad_end=False))
  weights = tf.signal.linear_to_mel_weight_matrix(
      opts.num_mel_bins, opts.fft_size // 2 + 1, opts.sample_rate, opts.lower_hz, opts.upper_hz)
  log_mel = tf.math.log(tf.maximum(tf.matmul(magnitude, weights), opts.log_floor))
  mfcc = tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :opts.num_mfcc]
  return magnitude.numpy(), log_mel.numpy(), mfcc.numpy()


def assert_close(actual, reference):
  # Relative error 1e-4; the absolute term only matters for entries near a zero crossing.
  reference = np.asarray(reference)
  np.testing.assert_allclose(np.asarray(actual), reference, rtol=1e-4,
                             atol=1e-5 * np.abs(reference).max())


def tone(num_samples: int, sample_rate: int) -> np.ndarray:
  """[S] 440 Hz + 1 kHz."""
  t = np.arange(num_samples) / sample_rate
  return 0.6 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1000 * t + 0.5)


def waveforms(num_samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
  """[3, S]: white noise, a random walk and the tone over a faint noise floor. (Far from a pure
  tone's frequencies, its mel bands hold only float32 round-off of the peak, whose log neither
  implementation gets to 1e-4; `test_a_pure_tone` compares those in energy instead.)"""
  rng = np.random.default_rng(seed)
  return np.stack([rng.normal(size=num_samples),
                   np.cumsum(rng.normal(size=num_samples)) * 0.05,
                   tone(num_samples, sample_rate) + 1e-3 * rng.normal(size=num_samples),
                   ]).astype(np.float32)


# ----------------------------------------------------------------------- against tf.signal


@pytest.mark.parametrize('name', CONFIGS)
def test_mel_matrix_matches_tf(name):
  opts = CONFIGS[name]
  want = tf.signal.linear_to_mel_weight_matrix(
      opts.num_mel_bins, opts.fft_size // 2 + 1, opts.sample_rate, opts.lower_hz,
      opts.upper_hz).numpy()
  got = fe.mel_matrix(opts)
  assert got.shape == want.shape == (opts.fft_size // 2 + 1, opts.num_mel_bins)
  assert got.dtype == np.float32 and np.all(got[0] == 0)   # the DC bin is zeroed, as in HTK
  # TF computes the filters in float32, these in float64: they differ by float32 rounding.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize('name, seconds', [('default', 0.025), ('default', 0.1234),
                                           ('default', 0.5), ('narrowband', 0.3)])
def test_features_match_tf(name, seconds):
  opts = CONFIGS[name]
  x = waveforms(int(seconds * opts.sample_rate), opts.sample_rate)
  magnitude, log_mel, mfcc = tf_features(x, opts)
  assert magnitude.shape[1] == opts.num_frames(x.shape[1])

  assert_close(fe.magnitude_spectrogram(x, opts), magnitude)
  assert_close(fe.log_mel(x, opts), log_mel)
  assert_close(fe.mfcc(jnp.asarray(log_mel), opts.num_mfcc), mfcc)
  # The module end to end (no normalisation, no augmentation), both feature kinds.
  for kind, want in (('log_mel', log_mel), ('mfcc', mfcc)):
    module = fe.Frontend(dataclasses.replace(opts, features=kind, normalize=False))
    features, frame_mask = module.apply({}, jnp.asarray(x))
    assert features.dtype == jnp.float32 and np.all(frame_mask)
    assert_close(features, want)


def test_a_pure_tone():
  opts = CONFIGS['default']
  x = tone(opts.sample_rate // 4, opts.sample_rate)[None].astype(np.float32)
  _, log_mel, mfcc = tf_features(x, opts)
  got = np.asarray(fe.log_mel(x, opts))
  # Mel energies to 1e-4 of each band, or 1e-6 of the loudest where only round-off is left.
  np.testing.assert_allclose(np.exp(got), np.exp(log_mel), rtol=1e-4,
                             atol=1e-6 * np.exp(log_mel).max())
  assert_close(fe.mfcc(jnp.asarray(log_mel), opts.num_mfcc), mfcc)
  # The loudest band is the one centred nearest 440 Hz; among the bands centred in 0.7-1.5 kHz,
  # the one nearest 1 kHz.
  energy_m = got[0].mean(axis=0)
  edges_mel = np.linspace(fe._hertz_to_mel(opts.lower_hz), fe._hertz_to_mel(opts.upper_hz),
                          opts.num_mel_bins + 2)
  centres_hz = 700 * np.expm1(edges_mel[1:-1] / 1127)
  assert energy_m.argmax() == np.abs(centres_hz - 440).argmin()
  near_1k = np.flatnonzero((centres_hz > 700) & (centres_hz < 1500))
  assert near_1k[energy_m[near_1k].argmax()] == np.abs(centres_hz - 1000).argmin()


# ----------------------------------------------------------------------- frames and masks


def test_num_frames_has_no_end_padding():
  opts = CONFIGS['default']   # 400-sample frames every 160 samples
  assert (opts.frame_length, opts.hop_length) == (400, 160)
  assert [opts.num_frames(s) for s in (400, 559, 560, 16000)] == [1, 1, 2, 98]
  with pytest.raises(ValueError, match='399 samples are shorter than one frame'):
    opts.num_frames(399)


def test_frame_mask_counts_frames_that_start_in_the_audio():
  opts = CONFIGS['default']
  lengths = [1600, 1, 0, 161, 160]
  sample_mask = np.arange(1600)[None] < np.array(lengths)[:, None]
  got = np.asarray(fe.frame_mask(jnp.asarray(sample_mask), opts))
  assert got.shape == (5, 8)
  # Frame t starts at 160 t: real while 160 t < length.
  assert got.sum(axis=1).tolist() == [8, 1, 0, 2, 1]
  assert np.all(got == (np.arange(8)[None] < got.sum(axis=1)[:, None]))   # prefixes


def test_normalize_uses_real_frames_only():
  rng = np.random.default_rng(1)
  x_btf = rng.normal(3.0, 2.0, size=(3, 12, 5)).astype(np.float32)
  lengths = np.array([12, 7, 0])
  mask_bt = np.arange(12)[None] < lengths[:, None]
  out = np.asarray(fe.normalize(jnp.asarray(x_btf), jnp.asarray(mask_bt)))
  for b, n in enumerate(lengths[:2]):
    real = x_btf[b, :n]
    np.testing.assert_allclose(out[b, :n], (real - real.mean(0)) / real.std(0), atol=1e-5)
    np.testing.assert_allclose(out[b, :n].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(out[b, :n].std(0), 1, atol=1e-5)
  assert np.all(out[~mask_bt] == 0.0)            # padded frames exactly 0, the all-padding row too
  # What sits in padded frames does not matter.
  noisy = np.where(mask_bt[..., None], x_btf, 1e6).astype(np.float32)
  np.testing.assert_array_equal(fe.normalize(jnp.asarray(noisy), jnp.asarray(mask_bt)), out)


def test_frontend_ignores_what_padding_holds():
  opts = CONFIGS['default']
  x = waveforms(3000, opts.sample_rate)
  lengths = np.array([3000, 1700, 900])
  mask = np.arange(3000)[None] < lengths[:, None]
  module = fe.Frontend(opts)
  silent = np.where(mask, x, 0.0).astype(np.float32)
  noisy = np.where(mask, x, np.random.default_rng(2).normal(size=x.shape) * 10).astype(np.float32)
  noisy[1, -1] = np.nan                          # not even NaN gets through
  f_silent, m_silent = module.apply({}, silent, mask)
  f_noisy, m_noisy = module.apply({}, noisy, mask)
  np.testing.assert_array_equal(f_noisy, f_silent)
  np.testing.assert_array_equal(m_noisy, m_silent)
  # 17 frames fit in 3000 samples; 11 and 6 of them start before sample 1700 and 900.
  assert np.asarray(m_silent).sum(axis=1).tolist() == [17, 11, 6]
  assert np.all(np.asarray(f_silent)[~np.asarray(m_silent)] == 0.0)


# ----------------------------------------------------------------------- SpecAugment


@functools.cache
def expected_coverage(size: int, max_width: int, count: int) -> np.ndarray:
  """[size]: the exact probability that position t is covered by one of `count` independent
  bands of width uniform in [0, max_width], start uniform in [0, size - width]."""
  t = np.arange(size)
  p_one = np.zeros(size)
  for w in range(max_width + 1):
    starts = np.arange(size - w + 1)
    covered = (t[None] >= starts[:, None]) & (t[None] < starts[:, None] + w)
    p_one += covered.mean(axis=0) / (max_width + 1)
  return 1 - (1 - p_one) ** count


AUGMENT = fe.FrontendOptions(num_mel_bins=20, time_masks=2, time_mask_max=10, freq_masks=2,
                             freq_mask_max=6)


@jax.jit
def augment(features, mask, key):
  return fe.spec_augment(features, mask, key, AUGMENT)


def masked_bands(out_btf, mask_bt):
  """(time-masked [B,T], freq-masked [B,F]): whole real frames / whole feature bins set to 0."""
  zero = (out_btf == 0) & mask_bt[..., None]
  time_bt = np.all(zero, axis=2) & mask_bt
  freq_bf = np.all(zero | ~mask_bt[..., None], axis=1)
  return time_bt, freq_bf


def test_spec_augment_statistics():
  batch, frames, real, bins = 4000, 50, 40, AUGMENT.num_features
  features = np.full((batch, frames, bins), 1.0, np.float32)
  features[:, real:] = 5.0                        # padded frames: must come out unchanged
  mask = np.broadcast_to(np.arange(frames) < real, (batch, frames))
  out = np.asarray(augment(features, mask, jax.random.key(0)))

  assert np.all(out[:, real:] == 5.0)             # no mask falls into padded frames
  assert set(np.unique(out[:, :real])) <= {0.0, 1.0}
  time_bt, freq_bf = masked_bands(out, mask)
  # Every zero is explained by a time band or a frequency band.
  explained = time_bt[..., None] | freq_bf[:, None]
  np.testing.assert_array_equal(out[:, :real] == 0, explained[:, :real])
  # Per-position coverage, i.e. width and start distributions, against the exact expectation
  # (4000 examples: a standard error under 0.008).
  np.testing.assert_allclose(time_bt[:, :real].mean(axis=0),
                             expected_coverage(real, AUGMENT.time_mask_max, 2), atol=0.03)
  np.testing.assert_allclose(freq_bf.mean(axis=0),
                             expected_coverage(bins, AUGMENT.freq_mask_max, 2), atol=0.03)
  # Independent per example: examples do not share their masks.
  assert len({row.tobytes() for row in time_bt[:100]}) > 50


def test_spec_augment_bands_start_inside_each_utterance():
  batch, frames = 3000, 60
  lengths = np.random.default_rng(3).integers(12, frames + 1, size=batch)
  mask = np.arange(frames)[None] < lengths[:, None]
  features = np.where(mask[..., None], 1.0, 5.0).astype(np.float32) * np.ones(
      (1, 1, AUGMENT.num_features), np.float32)
  out = np.asarray(augment(features, mask, jax.random.key(1)))
  assert np.all(out[~mask] == 5.0)
  time_bt, _ = masked_bands(out, mask)
  # Covered fraction of each utterance's real frames, against the exact expectation for its
  # length: the bands are placed within that utterance's frames, not the batch's.
  want = np.array([expected_coverage(n, AUGMENT.time_mask_max, 2).sum() for n in lengths])
  assert abs(time_bt.sum(axis=1).mean() - want.mean()) < 0.25
  # The last real frame is reached as often as the expectation says.
  last = time_bt[np.arange(batch), lengths - 1].mean()
  want_last = np.mean([expected_coverage(n, AUGMENT.time_mask_max, 2)[-1] for n in lengths])
  assert abs(last - want_last) < 0.03


def test_frontend_augments_in_training_only():
  opts = AUGMENT
  x = jnp.asarray(waveforms(8000, opts.sample_rate))
  module = fe.Frontend(opts)
  plain, mask = module.apply({}, x)
  want = fe.normalize(fe.log_mel(x, opts), mask)
  np.testing.assert_array_equal(plain, want)       # eval: features untouched, no rng needed

  def train(seed):
    return np.asarray(module.apply({}, x, train=True, rngs={'augment': jax.random.key(seed)})[0])
  a, again, b = train(0), train(0), train(1)
  np.testing.assert_array_equal(a, again)          # a pure function of the rng
  assert not np.array_equal(a, b)
  changed = a != np.asarray(plain)
  assert changed.any() and np.all(a[changed] == 0.0)

  # Without masks, training needs no 'augment' rng and changes nothing.
  quiet = fe.Frontend(dataclasses.replace(opts, time_masks=0, freq_masks=0))
  np.testing.assert_array_equal(quiet.apply({}, x, train=True)[0], plain)


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize('changes, match', [
    (dict(features='spectrogram'), r"features='spectrogram' is unknown"),
    (dict(fft_size=256), r'fft_size=256 must be >= the frame length, 400 samples'),
    (dict(lower_hz=-1.0), r'lower_hz=-1.0'),
    (dict(lower_hz=8000.0), r'lower_hz=8000.0 must be >= 0 and below upper_hz=7600.0'),
    (dict(upper_hz=9000.0), r'upper_hz=9000.0 must be <= the Nyquist frequency, 8000.0'),
    (dict(num_mfcc=41), r'num_mfcc=41 must be <= num_mel_bins=40'),
    (dict(num_mel_bins=0), r'num_mel_bins=0 must be a positive integer'),
    (dict(fft_size=512.0), r'fft_size=512.0 must be a positive integer'),
    (dict(sample_rate=-16000), r'sample_rate=-16000 must be a positive integer'),
    (dict(hop_ms=0.0), r'hop_ms=0.0 must be positive'),
    (dict(hop_ms=0.01), r'hop_ms=0.01 is under one sample'),
    (dict(log_floor=0.0), r'log_floor=0.0 must be positive'),
    (dict(time_masks=-1), r'time_masks=-1 must be an integer >= 0'),
    (dict(time_mask_max=-2), r'time_mask_max=-2 must be an integer >= 0'),
    (dict(freq_masks=-1), r'freq_masks=-1 must be an integer >= 0'),
    (dict(features='mfcc', freq_mask_max=14),
     r'freq_mask_max=14 must be <= the number of feature bins, 13'),
])
def test_bad_options_name_the_field(changes, match):
  with pytest.raises(ValueError, match=match):
    fe.FrontendOptions(**changes)


def test_bad_inputs_are_named():
  module = fe.Frontend(CONFIGS['default'])
  with pytest.raises(ValueError, match=r'waveforms \[batch, samples\]; got shape \(800,\)'):
    module.apply({}, jnp.zeros(800))
  with pytest.raises(ValueError, match=r'audio mask shape \(2, 700\) != waveform shape'):
    module.apply({}, jnp.zeros((2, 800)), jnp.ones((2, 700), bool))
  with pytest.raises(ValueError, match='300 samples are shorter than one frame'):
    module.apply({}, jnp.zeros((2, 300)))
