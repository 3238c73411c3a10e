"""Speech in the fusion module: every strategy takes the audio tower's tokens as query or context;
missing modalities (the learned stand-in token) at evaluation and per-example modality dropout in
training; and the model with three towers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion.models import audio
from mmfusion.models import frontend
from mmfusion.models import fusion
from mmfusion.models import layers
from mmfusion.models import towers

B, SAMPLES, W_IMAGE, N_IMAGE = 3, 4000, 8, 4
STACK = layers.StackOptions(width=16, depth=2, mlp_dim=32, num_heads=2)
LENGTHS = (4000, 2500, 1200)      # real samples per clip; the rest is padding


def audio_outputs(seed=0, garbage=0.0):
  """The audio tower's Encoded for 3 clips of different lengths (padding filled with garbage)."""
  tower = audio.AudioTransformer(
      embed_dim=8, stack=STACK.replace(width=12, num_heads=2), patch_time=4, patch_freq=10,
      frontend=frontend.FrontendOptions(num_mel_bins=20, time_masks=0, freq_masks=0))
  rng = np.random.default_rng(seed)
  mask = np.arange(SAMPLES)[None] < np.asarray(LENGTHS)[:, None]
  wave = np.where(mask, rng.normal(0, 0.1, (B, SAMPLES)), garbage).astype(np.float32)
  params = tower.init(jax.random.key(1), wave, mask)
  return tower.apply(params, wave, mask)


def image_outputs(seed=1):
  rng = np.random.default_rng(seed)
  return towers.Encoded(tokens=jnp.asarray(rng.normal(size=(B, N_IMAGE, W_IMAGE)), jnp.float32),
                        mask=jnp.ones((B, N_IMAGE), bool),
                        pooled=jnp.asarray(rng.normal(size=(B, W_IMAGE)), jnp.float32),
                        embedding=None)


def run(module, encoded, train=False, rng=0):
  tokens = {m: e.tokens for m, e in encoded.items()}
  masks = {m: e.mask for m, e in encoded.items()}
  pooled = {m: e.pooled for m, e in encoded.items()}
  full = {**{'image': image_outputs()}, **{'audio': audio_outputs()}}
  variables = module.init(jax.random.key(0), {m: e.tokens for m, e in full.items()},
                          {m: e.mask for m, e in full.items()},
                          {m: e.pooled for m, e in full.items()})
  return module.apply(variables, tokens, masks, pooled, train=train,
                      rngs={'dropout': jax.random.key(rng)} if train else None)


def fused_summary(out):
  if out['pooled'] is not None:
    return np.asarray(out['pooled'])
  return np.concatenate([np.asarray(out['pooled_by_modality'][m])
                         for m in sorted(out['pooled_by_modality'])], axis=-1)


ROLES = [('cross_attention', dict(query='audio', context='image')),
         ('cross_attention', dict(query='image', context='audio'))] + [
             (s, {}) for s in fusion.STRATEGIES if s != 'cross_attention']


@pytest.mark.parametrize('strategy,roles', ROLES, ids=lambda x: str(x))
def test_every_strategy_fuses_speech_and_padding_never_matters(strategy, roles):
  module = fusion.Fusion(strategy, STACK, **roles)
  clean = run(module, {'image': image_outputs(), 'audio': audio_outputs()})
  noisy = run(module, {'image': image_outputs(), 'audio': audio_outputs(garbage=7.0)})
  summary = fused_summary(clean)
  assert summary.shape[0] == B and np.isfinite(summary).all()
  np.testing.assert_allclose(summary, fused_summary(noisy), atol=1e-5)
  if roles.get('query') == 'audio':
    assert clean['tokens_by_modality']['audio'].shape[:2] == audio_outputs().mask.shape


@pytest.mark.parametrize('strategy', fusion.STRATEGIES)
def test_an_absent_modality_is_stood_in_for_by_its_missing_token(strategy):
  roles = dict(query='audio', context='image') if strategy == 'cross_attention' else {}
  module = fusion.Fusion(strategy, STACK, modality_dropout=(('image', 0.0),), **roles)
  both = fused_summary(run(module, {'image': image_outputs(), 'audio': audio_outputs()}))
  blind = fused_summary(run(module, {'audio': audio_outputs()}))
  assert blind.shape == both.shape and np.isfinite(blind).all()
  assert not np.allclose(blind, both)
  with pytest.raises(ValueError, match='needs at least two modalities|lacks'):
    run(fusion.Fusion(strategy, STACK, **roles), {'audio': audio_outputs()})


@pytest.mark.parametrize('strategy', ['cross_attention', 'early', 'bottleneck', 'weighted_sum'])
def test_modality_dropout_drops_whole_examples_in_training_only(strategy):
  roles = dict(query='audio', context='image') if strategy == 'cross_attention' else {}
  module = fusion.Fusion(strategy, STACK, modality_dropout=(('image', 0.5),), **roles)
  encoded = {'image': image_outputs(), 'audio': audio_outputs()}
  evaluated = fused_summary(run(module, encoded))
  blind = fused_summary(run(module, {'audio': audio_outputs()}))
  np.testing.assert_array_equal(evaluated, fused_summary(run(module, encoded)))
  dropped_counts = []
  for seed in range(12):
    trained = fused_summary(run(module, encoded, train=True, rng=seed))
    as_blind = np.isclose(trained, blind, atol=1e-5).all(axis=-1)
    as_seen = np.isclose(trained, evaluated, atol=1e-5).all(axis=-1)
    # Each example is either exactly the blind answer or exactly the full one.
    assert (as_blind ^ as_seen).all(), (seed, as_blind, as_seen)
    dropped_counts.append(as_blind.sum())
  rate = np.sum(dropped_counts) / (12 * B)
  assert 0.25 < rate < 0.75, rate


def test_modality_dropout_rates_are_checked():
  with pytest.raises(ValueError, match=r'modality_dropout.image = 1.0: a probability in \[0, 1\)'):
    fusion.build(dict(strategy='early', modality_dropout={'image': 1.0}),
                 lambda opts: STACK)
