"""Image tower (ViT): patchify, position embedding, encoder, cls | gap | map pooling, projection.
Registered as tower type 'vit'.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers
from mmfusion.models import towers
from mmfusion.models.attention import MultiHeadAttention
from mmfusion.models.encoder import Encoder

Array = jax.Array

POOLS = ('cls', 'gap', 'map')


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe cross-attends to the tokens (big_vision's MAP).
  With `mask_bn` (bool [B,N], True = real) the probe gives padded tokens exactly zero weight."""
  stack: layers.StackOptions

  @nn.compact
  def __call__(self, x_bnw: Array, mask_bn: Array | None = None) -> Array:
    batch, _, width = x_bnw.shape
    stack = self.stack
    probe_11w = self.param(
        'probe', layers.named_init(nn.initializers.xavier_uniform(), (None, None, 'embed')),
        (1, 1, width), stack.param_dtype)
    probe_b1w = jnp.tile(probe_11w.astype(stack.dtype), (batch, 1, 1))
    key_mask = None if mask_bn is None else mask_bn[:, None, None, :]
    x_b1w = MultiHeadAttention(stack, name='attn')(probe_b1w, x_bnw, mask=key_mask)
    y_b1w = layers.stack_norm(stack, 'ln')(x_b1w)
    x_b1w = x_b1w + layers.MlpBlock(stack, name='mlp')(y_b1w)
    return x_b1w[:, 0]


class ViT(nn.Module):
  """Vision transformer tower.

  `__call__(image [B,H,W,3], mask=None, train=False)` returns `towers.Encoded`: tokens [B,N,W],
  the encoder outputs of the N = (H/P)*(W/P) patches (a cls token is dropped, so tokens always
  map to patches); mask [B,N], all True; pooled [B,W], the pre-projection summary; embedding
  [B,D] = proj(pooled), NOT normalised (MultimodalModel normalises, in float32). tokens and
  pooled are in the compute dtype.

  `pre_norm` adds a LayerNorm ('pre_norm') between the embeddings and the encoder, as OpenAI's
  CLIP has (its ln_pre).

  Param names: embedding (patch conv), pos_embedding [N,W], cls (pool='cls'), pre_norm,
  encoder, map_head (pool='map'), proj.
  """
  embed_dim: int
  patch_size: int
  stack: layers.StackOptions
  pool: str = 'gap'
  pre_norm: bool = False

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r}; the image tower knows {POOLS}')
    if self.patch_size <= 0:
      raise ValueError(f'patch_size must be positive; got {self.patch_size}')
    super().__post_init__()

  @nn.compact
  def __call__(self, image_bhwc: Array, mask: Array | None = None, *,
               train: bool = False) -> towers.Encoded:
    if mask is not None:
      raise ValueError('the image tower takes no mask: every patch of an image is real')
    _, height, width_px, _ = image_bhwc.shape
    p, stack = self.patch_size, self.stack
    if height % p or width_px % p:
      raise ValueError(f'image size {height}x{width_px} is not divisible by patch size {p}')

    x = nn.Conv(
        stack.width, (p, p), strides=(p, p), padding='VALID',
        dtype=stack.dtype, param_dtype=stack.param_dtype,
        kernel_init=layers.named_init(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
        bias_init=layers.named_init(nn.initializers.zeros, ('embed',)), name='embedding')(
            image_bhwc)
    batch, gh, gw, _ = x.shape
    x_bnw = x.reshape(batch, gh * gw, stack.width)

    # The table is sized by the image at init; weights imported for another image size are
    # resampled (mmfusion/weights/posemb.py).
    pos_init = layers.named_init(nn.initializers.normal(stddev=0.02), ('length', 'embed'))
    pos_nw = self.param('pos_embedding', pos_init, (gh * gw, stack.width), stack.param_dtype)
    x_bnw = layers.constrain(x_bnw + pos_nw.astype(stack.dtype)[None], ('batch', 'length', 'embed'))
    x_bnw = towers.adversarial_hook(self, x_bnw)

    if self.pool == 'cls':
      cls_11w = self.param('cls', layers.named_init(nn.initializers.zeros, (None, None, 'embed')),
                           (1, 1, stack.width), stack.param_dtype)
      x_bnw = jnp.concatenate([jnp.tile(cls_11w.astype(stack.dtype), (batch, 1, 1)), x_bnw], axis=1)

    if self.pre_norm:
      x_bnw = layers.stack_norm(stack, 'pre_norm')(x_bnw)
    x_bnw = nn.Dropout(stack.dropout)(x_bnw, not train)
    encoder = Encoder(stack, name='encoder')
    if self.pool == 'cls':
      # The cls token comes out of the encoder on its own (computed apart in the last block,
      # which a loss reading only the pooled vector then skips for the patches: encoder.Encoder).
      x_bnw, pooled_bw = encoder(x_bnw, None, not train, jnp.zeros((batch,), jnp.int32))
      tokens_bnw = x_bnw[:, 1:]
    elif self.pool == 'gap':
      tokens_bnw = encoder(x_bnw, None, not train)
      pooled_bw = jnp.mean(tokens_bnw, axis=1)
    else:  # map
      tokens_bnw = encoder(x_bnw, None, not train)
      pooled_bw = MAPHead(stack, name='map_head')(tokens_bnw)

    embedding_bd = towers.projection(self.embed_dim, stack)(pooled_bw)
    return towers.Encoded(tokens=tokens_bnw, mask=jnp.ones(tokens_bnw.shape[:2], jnp.bool_),
                          pooled=pooled_bw, embedding=embedding_bd)


@towers.register('vit', options=dict(
    variant='', patch_size=8, width=96, depth=3, mlp_dim=384, num_heads=4, pool='gap',
    dropout=0.0, pre_norm=False, activation='gelu_tanh', norm_eps=1e-6))
def make_vit(options: dict, context: towers.BuildContext) -> ViT:
  """`variant` ('B/16', 'S', ...) overrides the explicit sizes, and the patch size with '/P'."""
  sizes = layers.decode_variant(options['variant'])
  patch_size = sizes.pop('patch_size', options['patch_size'])
  return ViT(embed_dim=context.embed_dim, patch_size=patch_size, pool=options['pool'],
             pre_norm=options['pre_norm'], stack=context.stack(options, **sizes))
