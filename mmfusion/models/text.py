"""Text tower: token and position embedding, causal or bidirectional encoder, eos|last|cls|gap pool.
The autoregressive text decoder (captioning) will live here too, built from the same layers.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers

Array = jax.Array
Dtype = Any

POOLS = ('eos', 'last', 'cls', 'gap')


def last_true_index(mask_bl: Array) -> Array:
  """Index of the last True per row ([B] int32); 0 for a row with no True."""
  length = mask_bl.shape[1]
  idx_b = length - 1 - jnp.argmax(mask_bl[:, ::-1], axis=1)
  return jnp.where(jnp.any(mask_bl, axis=1), idx_b, 0).astype(jnp.int32)


class TextEncoder(nn.Module):
  """Transformer text tower.

  `__call__(text [B,L] int, text_mask [B,L] bool, train=False)` returns
  `(tokens [B,L,W], pooled [B,W], embedding [B,D])`. `text_mask` is True for real tokens (the
  tokenizer ends each text with EOS, the last True, and pads with id 0 after it); padded
  keys are never attended to, so pad ids cannot change any real token's output. With
  `causal` each token also sees only earlier ones. tokens line up with `text_mask` (a cls
  token, if any, is dropped); embedding = proj(pooled) is NOT normalised.

  pool: 'eos' = the last real token (the natural summary under causal attention), 'last' =
  position L-1, 'cls' = a learned token prepended (needs causal=False: under causal attention
  a first token sees nothing), 'gap' = mean over real tokens.

  Param names: token_embedding [vocab,W], pos_embedding [L,W], cls (pool='cls'), encoder, proj.

  A later text *decoder* (captioning) is a separate module: causal self-attention plus
  cross-attention to another tower's tokens, built from layers.MultiHeadAttention with
  `x_kv` set, and a vocab projection.
  """
  vocab_size: int
  embed_dim: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  causal: bool = True
  pool: str = 'eos'
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
      raise ValueError(f'pool={self.pool!r}; the text tower knows {POOLS}')
    if self.pool == 'cls' and self.causal:
      raise ValueError("pool='cls' needs causal=False: a prepended cls token under causal "
                       'attention sees only itself')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.vocab_size <= 0:
      raise ValueError(f'vocab_size must be positive; got {self.vocab_size}')
    super().__post_init__()

  @nn.compact
  def __call__(self, text_bl: Array, text_mask_bl: Array, *,
               train: bool = False) -> tuple[Array, Array, Array]:
    if text_mask_bl.shape != text_bl.shape:
      raise ValueError(f'text_mask shape {text_mask_bl.shape} != text shape {text_bl.shape}')
    batch, length = text_bl.shape
    real_bl = text_mask_bl.astype(jnp.bool_)
    key_mask_bl = real_bl  # which positions may be attended to (grows by one with a cls token)

    x_blw = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=layers.named_init(nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
        name='token_embedding')(text_bl)
    pos_init = layers.named_init(nn.initializers.normal(stddev=0.02), ('length', 'embed'))
    pos_lw = self.param('pos_embedding', pos_init, (length, self.width), self.param_dtype)
    x_blw = layers.constrain(x_blw + pos_lw.astype(self.dtype)[None], ('batch', 'length', 'embed'))

    if self.pool == 'cls':
      cls_11w = self.param('cls', layers.named_init(nn.initializers.zeros, (None, None, 'embed')),
                           (1, 1, self.width), self.param_dtype)
      x_blw = jnp.concatenate([jnp.tile(cls_11w.astype(self.dtype), (batch, 1, 1)), x_blw], axis=1)
      key_mask_bl = jnp.concatenate([jnp.ones((batch, 1), jnp.bool_), key_mask_bl], axis=1)

    x_blw = nn.Dropout(self.dropout)(x_blw, not train)
    # Key-padding mask [B,1,1,L]; the causal triangle is added inside the attention.
    x_blw = layers.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        causal=self.causal, attention_impl=self.attention_impl, sow_weights=self.sow_weights,
        remat=self.remat, remat_save=self.remat_save, scan_layers=self.scan_layers,
        dtype=self.dtype, param_dtype=self.param_dtype, name='encoder')(
            x_blw, key_mask_bl[:, None, None, :], not train)

    if self.pool == 'cls':
      pooled_bw, x_blw = x_blw[:, 0], x_blw[:, 1:]
    elif self.pool == 'eos':
      idx_b = last_true_index(real_bl)
      pooled_bw = jnp.take_along_axis(x_blw, idx_b[:, None, None], axis=1)[:, 0]
    elif self.pool == 'last':
      pooled_bw = x_blw[:, -1]
    else:  # gap: mean over real tokens; an all-padding row pools to zeros, not NaN.
      weights_bl1 = real_bl.astype(jnp.float32)[:, :, None]
      count_b1 = jnp.maximum(jnp.sum(weights_bl1, axis=1), 1.0)
      pooled_bw = (jnp.sum(x_blw.astype(jnp.float32) * weights_bl1, axis=1) / count_b1).astype(
          self.dtype)

    # The output dim is left unnamed: naming it 'embed' too would repeat a logical axis.
    embedding_bd = nn.Dense(
        self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.named_init(nn.initializers.lecun_normal(), ('embed', None)),
        bias_init=layers.named_init(nn.initializers.zeros, (None,)), name='proj')(pooled_bw)
    return x_blw, pooled_bw, embedding_bd
