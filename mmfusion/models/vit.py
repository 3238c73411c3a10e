"""Image tower (ViT): patchify, position embedding, encoder, cls|gap|map pooling, projection.
Also owns the size presets ('Ti', 'B/16', ...) that every tower's `variant` names.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers

Array = jax.Array
Dtype = Any

# name -> (width, depth, mlp_dim, num_heads), as in "An Image is Worth 16x16 Words" and big_vision.
SIZES: dict[str, tuple[int, int, int, int]] = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}
POOLS = ('cls', 'gap', 'map')


def decode_variant(variant: str) -> dict[str, int]:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16).

  '' -> {} (sizes come from the explicit fields). The patch size is present only when the
  variant has a '/P' suffix. The returned values override explicit size fields.
  """
  if not variant:
    return {}
  match = re.fullmatch(r'([A-Za-z]+)(?:/(\d+))?', variant)
  if match is None or match.group(1) not in SIZES:
    raise ValueError(f'unknown model variant {variant!r}; known sizes: {sorted(SIZES)}, '
                     "optionally followed by '/<patch size>' (e.g. 'B/16')")
  width, depth, mlp_dim, num_heads = SIZES[match.group(1)]
  sizes = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if match.group(2) is not None:
    sizes['patch_size'] = int(match.group(2))
  return sizes


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe cross-attends to the tokens (big_vision's MAP)."""
  num_heads: int
  mlp_dim: int
  attention_impl: str = 'xla'
  sow_weights: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bnw: Array) -> Array:
    batch, _, width = x_bnw.shape
    probe_11w = self.param(
        'probe', layers.named_init(nn.initializers.xavier_uniform(), (None, None, 'embed')),
        (1, 1, width), self.param_dtype)
    probe_b1w = jnp.tile(probe_11w.astype(self.dtype), (batch, 1, 1))
    x_b1w = layers.MultiHeadAttention(
        num_heads=self.num_heads, attention_impl=self.attention_impl,
        sow_weights=self.sow_weights, dtype=self.dtype, param_dtype=self.param_dtype,
        name='attn')(probe_b1w, x_bnw)
    y_b1w = layers.layer_norm(self.dtype, self.param_dtype, 'ln')(x_b1w)
    x_b1w = x_b1w + layers.MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name='mlp')(y_b1w)
    return x_b1w[:, 0]


class ViT(nn.Module):
  """Vision transformer tower.

  `__call__(image [B,H,W,3], train=False)` returns
  `(tokens [B,N,W], pooled [B,W], embedding [B,D])`. tokens are the encoder outputs of the
  N = (H/P)*(W/P) patches (a cls token is dropped, so tokens always map to patches); pooled is
  the pre-projection summary; embedding = proj(pooled) is NOT normalised (MultimodalModel
  normalises, in float32). tokens and pooled are in the compute dtype.

  Param names: embedding (patch conv), pos_embedding [N,W], cls (pool='cls'), encoder,
  map_head (pool='map'), proj.
  """
  embed_dim: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pool: str = 'gap'
  dropout: float = 0.0
  attention_impl: str = 'xla'
  sow_weights: bool = False
  remat: str = 'none'
  remat_save: tuple[str, ...] = ()
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r}; the image tower knows {POOLS}')
    if self.patch_size <= 0:
      raise ValueError(f'patch_size must be positive; got {self.patch_size}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    super().__post_init__()

  @nn.compact
  def __call__(self, image_bhwc: Array, *, train: bool = False) -> tuple[Array, Array, Array]:
    _, height, width_px, _ = image_bhwc.shape
    p = self.patch_size
    if height % p or width_px % p:
      raise ValueError(f'image size {height}x{width_px} is not divisible by patch size {p}')

    x = nn.Conv(
        self.width, (p, p), strides=(p, p), padding='VALID',
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.named_init(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
        bias_init=layers.named_init(nn.initializers.zeros, ('embed',)), name='embedding')(
            image_bhwc)
    batch, gh, gw, _ = x.shape
    x_bnw = x.reshape(batch, gh * gw, self.width)

    # The table is sized by the image at init; loading it for another image size needs
    # resampling (big_vision's `resample_posemb`), which is future work in checkpoint loading.
    pos_init = layers.named_init(nn.initializers.normal(stddev=0.02), ('length', 'embed'))
    pos_nw = self.param('pos_embedding', pos_init, (gh * gw, self.width), self.param_dtype)
    x_bnw = layers.constrain(x_bnw + pos_nw.astype(self.dtype)[None], ('batch', 'length', 'embed'))

    if self.pool == 'cls':
      cls_11w = self.param('cls', layers.named_init(nn.initializers.zeros, (None, None, 'embed')),
                           (1, 1, self.width), self.param_dtype)
      x_bnw = jnp.concatenate([jnp.tile(cls_11w.astype(self.dtype), (batch, 1, 1)), x_bnw], axis=1)

    x_bnw = nn.Dropout(self.dropout)(x_bnw, not train)
    x_bnw = layers.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        attention_impl=self.attention_impl, sow_weights=self.sow_weights, remat=self.remat,
        remat_save=self.remat_save, scan_layers=self.scan_layers, dtype=self.dtype,
        param_dtype=self.param_dtype, name='encoder')(x_bnw, None, not train)

    if self.pool == 'cls':
      pooled_bw, tokens_bnw = x_bnw[:, 0], x_bnw[:, 1:]
    elif self.pool == 'gap':
      pooled_bw, tokens_bnw = jnp.mean(x_bnw, axis=1), x_bnw
    else:  # map
      pooled_bw = MAPHead(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, attention_impl=self.attention_impl,
          sow_weights=self.sow_weights, dtype=self.dtype, param_dtype=self.param_dtype,
          name='map_head')(x_bnw)
      tokens_bnw = x_bnw

    # The output dim is left unnamed: naming it 'embed' too would repeat a logical axis.
    embedding_bd = nn.Dense(
        self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.named_init(nn.initializers.lecun_normal(), ('embed', None)),
        bias_init=layers.named_init(nn.initializers.zeros, (None,)), name='proj')(pooled_bw)
    return tokens_bnw, pooled_bw, embedding_bd
