"""Speech tower (AST-style): waveform -> on-device front-end -> (time, frequency) patches, position
embedding, encoder with padded patches masked out, cls | gap | map pooling, projection.
Registered as tower type 'ast'.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmfusion.models import frontend as frontend_lib
from mmfusion.models import layers
from mmfusion.models import towers
from mmfusion.models import vit
from mmfusion.models.encoder import Encoder

Array = jax.Array

POOLS = ('cls', 'gap', 'map')
POS_EMBEDDINGS = ('learned', 'sincos2d')


def sincos_2d(num_time: int, num_freq: int, width: int, temperature: float = 10_000.0
              ) -> np.ndarray:
  """[num_time * num_freq, width] fixed 2-D sin-cos embedding (big_vision's posemb_sincos_2d),
  time-major: a quarter of the channels each for sin/cos of the frequency and time index. Row
  (i, j) does not depend on num_time, so the embedding of a patch ignores the input's length."""
  quarter = width // 4
  omega_d = 1.0 / temperature ** (np.arange(quarter) / (quarter - 1))
  time_n, freq_n = (g.reshape(-1) for g in np.mgrid[:num_time, :num_freq])
  time_nd, freq_nd = time_n[:, None] * omega_d, freq_n[:, None] * omega_d
  return np.concatenate([np.sin(freq_nd), np.cos(freq_nd), np.sin(time_nd), np.cos(time_nd)],
                        axis=1).astype(np.float32)


class AudioTransformer(nn.Module):
  """Audio spectrogram transformer over a waveform.

  `__call__(waveform [B,S] float, mask [B,S] bool or None (= all real), train=False)` returns
  `towers.Encoded`: tokens [B,N,W] for the N = Nt*Nf patches in time-major order (a cls token
  is dropped), mask [B,N] (a patch is real iff its first frame is, see frontend.frame_mask),
  pooled [B,W], embedding [B,D] = proj(pooled), NOT normalised. Padded patches are masked out
  as keys of every attention (and of the MAP probe), so real tokens, pooled and embedding depend
  neither on the padding's content nor on its length; the tokens of padded patches are not
  meaningful (read them with the mask).

  The front-end (frontend.Frontend: log-mel or MFCC, normalisation, SpecAugment in training)
  runs in float32; its features are cast to the compute dtype before the patch conv.
  Patches are patch_time frames x patch_freq feature bins, every stride_time / stride_freq
  (0 = the patch size: no overlap).

  pos_embedding: 'learned' = a param [Nt_max, Nf, W] sized by the init batch's length (shorter
  inputs use its first rows, longer ones fail); 'sincos2d' = fixed (no param, any length).

  Param names: embedding (patch conv), pos_embedding ('learned'), cls (pool='cls'), encoder,
  map_head (pool='map'), proj.
  """
  embed_dim: int
  stack: layers.StackOptions
  frontend: frontend_lib.FrontendOptions = frontend_lib.FrontendOptions()
  patch_time: int = 8
  patch_freq: int = 20
  stride_time: int = 0
  stride_freq: int = 0
  pos_embedding: str = 'learned'
  pool: str = 'gap'

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r}; the audio tower knows {POOLS}')
    if self.pos_embedding not in POS_EMBEDDINGS:
      raise ValueError(f'pos_embedding={self.pos_embedding!r}; expected one of {POS_EMBEDDINGS}')
    for name in ('patch_time', 'patch_freq'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name}={getattr(self, name)} must be positive')
    for name in ('stride_time', 'stride_freq'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name}={getattr(self, name)} must be >= 0 (0 = the patch size)')
    if self.patch_freq > self.frontend.num_features:
      raise ValueError(f'patch_freq={self.patch_freq} is more than the '
                       f'{self.frontend.num_features} feature bins of the front-end '
                       f'(features={self.frontend.features!r})')
    if self.pos_embedding == 'sincos2d' and (self.stack.width % 4 or self.stack.width < 8):
      raise ValueError(f"pos_embedding='sincos2d' needs a width divisible by 4 and >= 8; got "
                       f'width={self.stack.width}')
    super().__post_init__()

  @property
  def strides(self) -> tuple[int, int]:
    return self.stride_time or self.patch_time, self.stride_freq or self.patch_freq

  @nn.compact
  def __call__(self, waveform_bs: Array, mask_bs: Array | None = None, *,
               train: bool = False) -> towers.Encoded:
    stack = self.stack
    features_btf, frame_mask_bt = frontend_lib.Frontend(self.frontend, name='frontend')(
        waveform_bs, mask_bs, train=train)
    batch, num_frames, _ = features_btf.shape
    if num_frames < self.patch_time:
      raise ValueError(f'{waveform_bs.shape[1]} samples give {num_frames} frames, fewer than '
                       f'patch_time={self.patch_time}')

    stride_time, stride_freq = self.strides
    x = nn.Conv(
        stack.width, (self.patch_time, self.patch_freq), strides=(stride_time, stride_freq),
        padding='VALID', dtype=stack.dtype, param_dtype=stack.param_dtype,
        kernel_init=layers.named_init(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
        bias_init=layers.named_init(nn.initializers.zeros, ('embed',)), name='embedding')(
            features_btf.astype(stack.dtype)[..., None])
    _, num_time, num_freq, _ = x.shape
    x_bnw = x.reshape(batch, num_time * num_freq, stack.width)
    # A patch is real iff its first frame is; frame masks are prefixes, so token masks are too
    # (per frequency row, in time-major order).
    real_bt = frame_mask_bt[:, ::stride_time][:, :num_time]
    real_bn = jnp.repeat(real_bt, num_freq, axis=1)

    x_bnw = layers.constrain(x_bnw + self._pos_embedding(num_time, num_freq, waveform_bs.shape[1]),
                             ('batch', 'length', 'embed'))
    key_mask_bn = real_bn
    if self.pool == 'cls':
      cls_11w = self.param('cls', layers.named_init(nn.initializers.zeros, (None, None, 'embed')),
                           (1, 1, stack.width), stack.param_dtype)
      x_bnw = jnp.concatenate([jnp.tile(cls_11w.astype(stack.dtype), (batch, 1, 1)), x_bnw], axis=1)
      key_mask_bn = jnp.concatenate([jnp.ones((batch, 1), jnp.bool_), key_mask_bn], axis=1)

    x_bnw = nn.Dropout(stack.dropout)(x_bnw, not train)
    # Key-padding mask [B,1,1,N]: no query, real or padded, attends to a padded patch.
    encoder = Encoder(stack, name='encoder')
    key_mask_b11n = key_mask_bn[:, None, None, :]
    if self.pool == 'cls':
      # The cls token comes out of the encoder on its own (encoder.Encoder: a loss reading only
      # the pooled vector then skips the patches in the last block).
      x_bnw, pooled_bw = encoder(x_bnw, key_mask_b11n, not train, jnp.zeros((batch,), jnp.int32))
      x_bnw = x_bnw[:, 1:]
    else:
      x_bnw = encoder(x_bnw, key_mask_b11n, not train)
    if self.pool == 'cls':
      pass   # pooled above
    elif self.pool == 'gap':  # mean over real tokens; an all-padding row pools to zeros, not NaN.
      weights_bn1 = real_bn.astype(jnp.float32)[:, :, None]
      count_b1 = jnp.maximum(jnp.sum(weights_bn1, axis=1), 1.0)
      pooled_bw = (jnp.sum(x_bnw.astype(jnp.float32) * weights_bn1, axis=1) / count_b1).astype(
          stack.dtype)
    else:  # map
      pooled_bw = vit.MAPHead(stack, name='map_head')(x_bnw, real_bn)

    embedding_bd = towers.projection(self.embed_dim, stack)(pooled_bw)
    return towers.Encoded(tokens=x_bnw, mask=real_bn, pooled=pooled_bw, embedding=embedding_bd)

  def _pos_embedding(self, num_time: int, num_freq: int, num_samples: int) -> Array:
    """[1, Nt*Nf, W] in the compute dtype."""
    stack = self.stack
    if self.pos_embedding == 'sincos2d':
      return jnp.asarray(sincos_2d(num_time, num_freq, stack.width), stack.dtype)[None]
    # The table keeps the time length of the batch it was initialised with; once it exists, its
    # own shape is passed back to `param` (which checks shapes), and a shorter input reads a
    # prefix of its rows: time patch i gets row i whatever the input's length.
    max_time = num_time
    if self.has_variable('params', 'pos_embedding'):
      max_time = nn.meta.unbox(self.get_variable('params', 'pos_embedding')).shape[0]
    if num_time > max_time:
      raise ValueError(f'{num_samples} samples give {num_time} time patches, but the learned '
                       f'pos_embedding holds {max_time} (sized by the batch it was initialised '
                       'with): initialise with the longest input, or use sincos2d')
    pos_init = layers.named_init(nn.initializers.normal(stddev=0.02), ('length', None, 'embed'))
    pos_tfw = self.param('pos_embedding', pos_init, (max_time, num_freq, stack.width),
                         stack.param_dtype)
    return pos_tfw[:num_time].reshape(1, num_time * num_freq, stack.width).astype(stack.dtype)


FRONTEND_OPTIONS = {f.name: f.default for f in dataclasses.fields(frontend_lib.FrontendOptions)}


@towers.register('ast', options=dict(
    variant='', width=96, depth=3, mlp_dim=384, num_heads=4, pool='gap', dropout=0.0,
    patch_time=8, patch_freq=20, stride_time=0, stride_freq=0, pos_embedding='learned',
    **FRONTEND_OPTIONS))
def make_ast(options: dict, context: towers.BuildContext) -> AudioTransformer:
  """`variant` ('B/16', 'S', ...) overrides the explicit sizes; a '/P' suffix sets both patch
  sizes to P (square P x P patches, as AST's 16 x 16). The front-end takes every
  FrontendOptions field by its name."""
  sizes = layers.decode_variant(options['variant'])
  patch = sizes.pop('patch_size', None)
  patch_time, patch_freq = (options['patch_time'], options['patch_freq']) if patch is None else (
      patch, patch)
  return AudioTransformer(
      embed_dim=context.embed_dim, stack=context.stack(options, **sizes),
      frontend=frontend_lib.FrontendOptions(**{k: options[k] for k in FRONTEND_OPTIONS}),
      patch_time=patch_time, patch_freq=patch_freq, stride_time=options['stride_time'],
      stride_freq=options['stride_freq'], pos_embedding=options['pos_embedding'],
      pool=options['pool'])
