"""The AST-style speech tower (mmfusion/models/audio.py): shapes for every pool and position
embedding, scanned = unrolled, bfloat16, padding that gets exactly zero attention and changes no
real output, clear errors, and the tower inside the multimodal model. Tiny sizes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion import config as config_lib
from mmfusion.models import audio
from mmfusion.models import layout
from mmfusion.models import model as model_lib
from mmfusion.models import towers

B, D, W = 2, 8, 16
# 16 mel bins in 8-bin bands (Nf = 2); 4-frame patches. 4000 samples = 23 frames -> 5 x 2 patches.
TINY = dict(width=W, depth=1, mlp_dim=32, num_heads=2, num_mel_bins=16, patch_time=4,
            patch_freq=8, freq_mask_max=4)
S = 4000


def build(context=None, **options):
  context = context or towers.BuildContext(embed_dim=D)
  return towers.build('audio', dict(type='ast', **{**TINY, **options}), context)


def speech(num_samples: int, lengths, seed: int = 0, padding: str = 'zeros'):
  """(waveform [B,S] float32, mask [B,S] bool): noise, real for the first `lengths` samples;
  padding 'zeros' or 'noise'."""
  rng = np.random.default_rng(seed)
  mask = np.arange(num_samples)[None] < np.asarray(lengths)[:, None]
  x = rng.normal(size=(len(lengths), 16000))[:, :num_samples]   # the same audio at any length
  fill = 0.0 if padding == 'zeros' else np.random.default_rng(seed + 1).normal(
      size=x.shape) * 5
  return jnp.asarray(np.where(mask, x, fill), jnp.float32), jnp.asarray(mask)


def num_params(variables):
  return sum(x.size for x in jax.tree.leaves(nn.unbox(variables)['params']))


@pytest.mark.parametrize('pool', audio.POOLS)
@pytest.mark.parametrize('pos_embedding', audio.POS_EMBEDDINGS)
def test_shapes(pool, pos_embedding):
  tower = build(pool=pool, pos_embedding=pos_embedding)
  x, mask = speech(S, [S, 2000])
  variables = tower.init(jax.random.key(0), x, mask)
  tokens, token_mask, pooled, emb = tower.apply(variables, x, mask)
  assert tokens.shape == (B, 5 * 2, W)             # cls dropped; 5 time x 2 frequency patches
  assert token_mask.shape == (B, 10) and token_mask.dtype == jnp.bool_
  # 2000 samples: frames 0..12 start inside the audio, so time patches 0..3 (first frames
  # 0, 4, 8, 12) are real, each in both frequency bands.
  assert token_mask.sum(axis=1).tolist() == [10, 8]
  assert np.all(token_mask[1, :8]) and not np.any(token_mask[1, 8:])
  assert pooled.shape == (B, W) and emb.shape == (B, D)
  params = nn.unbox(variables)['params']
  assert ('pos_embedding' in params) == (pos_embedding == 'learned')
  if pos_embedding == 'learned':
    assert params['pos_embedding'].shape == (5, 2, W)
  assert ('cls' in params) == (pool == 'cls') and ('map_head' in params) == (pool == 'map')
  assert np.all(np.isfinite(emb))


def test_every_param_has_logical_axis_names():
  tower = build(pool='map', stride_time=2)     # overlapping patches: 10 x 2
  x, mask = speech(S, [S, 1000])
  boxed = tower.init(jax.random.key(0), x, mask)['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  assert boxed['pos_embedding'].names == ('length', None, 'embed')
  assert boxed['pos_embedding'].value.shape == (10, 2, W)
  assert boxed['embedding']['kernel'].names == (None, None, None, 'embed')


def test_scanned_layers_match_unrolled():
  context = towers.BuildContext(embed_dim=D)
  unrolled = build(context, depth=2, pool='cls')
  scanned = build(towers.BuildContext(embed_dim=D, scan_layers=True, remat='full'), depth=2,
                  pool='cls')
  x, mask = speech(S, [S, 2500])
  variables = unrolled.init(jax.random.key(0), x, mask)
  scanned_vars = scanned.init(jax.random.key(0), x, mask)
  assert num_params(variables) == num_params(scanned_vars)
  params = nn.unbox(variables)['params']
  want = unrolled.apply({'params': params}, x, mask)
  got = scanned.apply({'params': layout.scan_layout(params)}, x, mask)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute():
  tower = build(towers.BuildContext(embed_dim=D, dtype=jnp.bfloat16), pool='map')
  x, mask = speech(S, [S, 1500])
  variables = tower.init(jax.random.key(0), x, mask)
  tokens, _, pooled, emb = tower.apply(variables, x, mask)
  assert tokens.dtype == pooled.dtype == emb.dtype == jnp.bfloat16
  assert jax.tree.leaves(nn.unbox(variables))[0].dtype == jnp.float32   # params stay float32
  assert np.all(np.isfinite(np.asarray(emb, np.float32)))


def sown_weights(intermediates):
  """{path: attention weights [..., B, H, Lq, Lk]} of every attention that sowed."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [p.key for p in path if hasattr(p, 'key')]
    if 'attention_weights' in keys:
      found['/'.join(keys[:keys.index('attention_weights')])] = np.asarray(leaf)
  return found


@pytest.mark.parametrize('pool', audio.POOLS)
def test_padding_is_never_attended_and_changes_nothing(pool):
  tower = build(towers.BuildContext(embed_dim=D, sow_attention=True), depth=2, pool=pool)
  lengths = [3000, 1700]
  long_x, long_mask = speech(8000, lengths)       # 48 frames -> 12 time patches
  variables = tower.init(jax.random.key(0), long_x, long_mask)   # pos_embedding for 12
  run = jax.jit(lambda x, m: tower.apply(variables, x, m, mutable=['intermediates']))

  # Padding by at least a patch's worth of samples: every patch whose first frame starts in the
  # audio is computed (3800 samples: 22 frames, 5 time patches).
  short = run(*speech(3800, lengths))
  noisy = run(*speech(3800, lengths, padding='noise'))
  longer = run(long_x, long_mask)

  (tokens, token_mask, pooled, emb), state = short
  real = np.asarray(token_mask)
  # 3000 samples: frames 0..18 start in the audio -> time patches 0..4; 1700: 0..10 -> 0..2.
  assert real.sum(axis=1).tolist() == [10, 6] and tokens.shape == (B, 10, W)
  weights = sown_weights(state['intermediates'])
  assert len(weights) == 2 + (pool == 'map')
  for path, w in weights.items():
    keys_b1k = real if w.shape[-1] == real.shape[1] else np.pad(real, ((0, 0), (1, 0)),
                                                                constant_values=True)
    padded = np.broadcast_to(~keys_b1k[:, None, None, :], w.shape)
    assert np.all(w[padded] == 0.0), path       # exactly zero, not just small
    assert np.all(w[~padded] > 0.0), path

  for (other, other_mask, other_pooled, other_emb), _ in (noisy, longer):
    for b, n in enumerate(real.sum(axis=1)):
      np.testing.assert_array_equal(other_mask[b, :n], True)
      np.testing.assert_array_equal(other_mask[b, n:], False)
      np.testing.assert_allclose(other[b, :n], tokens[b, :n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other_pooled, pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other_emb, emb, rtol=1e-5, atol=1e-6)


def test_all_padding_row_is_finite():
  tower = build(pool='gap')
  x, mask = speech(S, [S, 0])
  variables = tower.init(jax.random.key(0), x, mask)
  tokens, token_mask, pooled, emb = tower.apply(variables, x, mask)
  assert not np.any(token_mask[1])
  np.testing.assert_array_equal(pooled[1], 0.0)
  assert np.all(np.isfinite(tokens)) and np.all(np.isfinite(emb))


def test_longer_input_than_the_learned_table_fails_clearly():
  tower = build()
  variables = tower.init(jax.random.key(0), *speech(S, [S, S]))
  with pytest.raises(ValueError, match=r'8000 samples give 12 time patches, but the learned '
                                       r'pos_embedding holds 5'):
    tower.apply(variables, *speech(8000, [S, S]))
  with pytest.raises(ValueError, match=r'400 samples give 1 frames, fewer than patch_time=4'):
    tower.init(jax.random.key(0), *speech(400, [400, 400]))
  # A fixed embedding takes any length.
  sincos = build(pos_embedding='sincos2d')
  variables = sincos.init(jax.random.key(0), *speech(S, [S, S]))
  assert sincos.apply(variables, *speech(8000, [S, S])).tokens.shape == (B, 24, W)


@pytest.mark.parametrize('changes, match', [
    (dict(bogus=1), r"config.model.towers.audio has \['bogus'\], which tower type 'ast' does "),
    (dict(pool='avg'), r"config.model.towers.audio: pool='avg'; the audio tower knows"),
    (dict(pos_embedding='rope'), r"pos_embedding='rope'; expected one of"),
    (dict(patch_freq=20), r'patch_freq=20 is more than the 16 feature bins'),
    (dict(patch_time=0), r'patch_time=0 must be positive'),
    (dict(stride_freq=-1), r'stride_freq=-1 must be >= 0'),
    (dict(features='mfcc', num_mfcc=20), r'num_mfcc=20 must be <= num_mel_bins=16'),
    (dict(fft_size=128), r'config.model.towers.audio: fft_size=128 must be >= the frame length'),
    (dict(pos_embedding='sincos2d', width=18, num_heads=2), r'width divisible by 4'),
    (dict(variant='Z'), r"unknown model variant 'Z'"),
])
def test_bad_options_are_named(changes, match):
  with pytest.raises(ValueError, match=match):
    build(**changes)


def test_variant_patch_suffix_sets_both_patch_sizes():
  tower = build(variant='mu/8', num_mel_bins=16)
  assert (tower.patch_time, tower.patch_freq) == (8, 8)
  assert (tower.stack.width, tower.stack.depth) == (32, 1)


def test_in_the_model_with_an_image_tower():
  config = config_lib.base().model.to_dict()
  config.update(embed_dim=D, towers=dict(
      image=dict(type='vit', patch_size=4, **{k: TINY[k] for k in
                                              ('width', 'depth', 'mlp_dim', 'num_heads')}),
      audio=dict(type='ast', **TINY)))
  model = model_lib.build(config, vocab_size=0)
  x, mask = speech(S, [S, 2200])
  batch = {'image': jnp.zeros((B, 8, 8, 3)), 'audio': x, 'audio_mask': mask}
  out, variables = model.init_with_output(jax.random.key(0), batch)
  assert out['embeddings']['audio'].shape == (B, D)
  np.testing.assert_allclose(np.linalg.norm(out['embeddings']['audio'], axis=-1), 1.0, atol=1e-5)
  assert out['masks']['audio'].sum(axis=1).tolist() == [10, 8]
  assert 'audio' in variables['params'] and 'image' in variables['params']

  # Training draws SpecAugment masks from the 'augment' stream the trainer provides.
  assert 'augment' in model_lib.RNG_STREAMS
  rngs = {name: jax.random.key(i) for i, name in enumerate(model_lib.RNG_STREAMS)}
  trained = model.apply(variables, batch, train=True, rngs=rngs)
  assert not np.allclose(trained['embeddings']['audio'], out['embeddings']['audio'])
  np.testing.assert_allclose(trained['embeddings']['image'], out['embeddings']['image'])
