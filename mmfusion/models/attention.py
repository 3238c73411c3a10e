"""Multi-head dot-product attention (self and cross): the explicit softmax(q k^T / sqrt(d)) v whose
weights explain.py reads, the fused kernels (`jax.nn.dot_product_attention`: XLA, cuDNN flash
attention, whose masked calls need their operands shaped as cuDNN takes them), one fused Q/K/V
matmul, and the pooled query computed apart (`pool_at`). Queries, keys and values carry the
logical axes BQHD.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfusion.models.layers import HeadsDense, StackOptions, constrain, lora_kwargs

Array = jax.Array

BQHD = ('batch', 'length', 'heads', 'kv')   # logical axes of queries, keys, values per head


def take_tokens(x_blw: Array, index_b: Array) -> Array:
  """The token at `index_b` (int [B]) of each example: [B,1,W]."""
  return jnp.take_along_axis(x_blw, index_b[:, None, None].astype(jnp.int32), axis=1)


def _as_4d(mask: Array) -> Array:
  """Prepends unit dims (numpy broadcasting) so a mask is 4-D, as the attention kernels need."""
  if mask.ndim > 4:
    raise ValueError(f'attention mask must broadcast to [B, heads, Lq, Lk]; got shape {mask.shape}')
  return mask.astype(jnp.bool_).reshape((1,) * (4 - mask.ndim) + mask.shape)


def cudnn_masked_operands(q_bqhd: Array, k_bkhd: Array, v_bkhd: Array,
                          mask: Array) -> tuple[Array, Array, Array, Array]:
  """(q, k, v, mask) as cuDNN's fused attention takes a masked call; the caller keeps the
  first Lq outputs.

  jax hands a mask to cuDNN as an additive bias, which cuDNN takes only at the full
  [B, heads or 1, Lq, Lk] (a key-padding mask [B,1,1,Lk] is refused) and, in training, only at
  even lengths (CLIP's 77 text tokens are odd, as are ViT-B/16's 197 image tokens where text
  attends to them in fusion). So the mask is
  broadcast over queries, and an odd length grows by one: a zero query, whose output is
  dropped, and a zero key that no query may attend to. Exact for any mask, as the padded key
  gets no weight and the padded query's output is never read."""
  batch, len_q, len_k = q_bqhd.shape[0], q_bqhd.shape[1], k_bkhd.shape[1]
  mask = _as_4d(mask)
  mask = jnp.broadcast_to(mask, (batch, mask.shape[1], len_q, len_k))
  pad_q, pad_k = len_q % 2, len_k % 2
  if pad_q or pad_k:
    def grow(x_blhd: Array, pad: int) -> Array:
      return jnp.pad(x_blhd, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_bqhd, k_bkhd, v_bkhd = grow(q_bqhd, pad_q), grow(k_bkhd, pad_k), grow(v_bkhd, pad_k)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))   # False: never attended
  return q_bqhd, k_bkhd, v_bkhd, mask


def attention_weights(q_bqhd: Array, k_bkhd: Array, mask: Array | None) -> Array:
  """softmax(q k^T / sqrt(d)) in plain jnp, at least in float32: weights [B,H,Lq,Lk]. `mask`
  (bool, broadcastable to [B,H,Lq,Lk], True = may attend): masked weights are exactly 0, and a
  row with no key to attend to is all zeros, never NaN."""
  scale = q_bqhd.shape[-1] ** -0.5
  acc_dtype = jnp.promote_types(q_bqhd.dtype, jnp.float32)
  logits_bhqk = jnp.einsum('bqhd,bkhd->bhqk', q_bqhd, k_bkhd,
                           preferred_element_type=acc_dtype) * scale
  if mask is None:
    return jax.nn.softmax(logits_bhqk, axis=-1)
  logits_bhqk = jnp.where(mask, logits_bhqk, jnp.finfo(acc_dtype).min)
  # `where` after the softmax makes masked weights exactly 0, and turns the uniform
  # weights of a fully-masked row into zeros (never NaN: the row max is finite).
  return jnp.where(mask, jax.nn.softmax(logits_bhqk, axis=-1), 0.0)


def attend(weights_bhqk: Array, v_bkhd: Array) -> Array:
  """The weighted sum of values: [B,Lq,H,D]."""
  return jnp.einsum('bhqk,bkhd->bqhd', weights_bhqk.astype(v_bkhd.dtype), v_bkhd)


def explicit_attention(q_bqhd: Array, k_bkhd: Array, v_bkhd: Array,
                       mask: Array | None) -> tuple[Array, Array]:
  """(output [B,Lq,H,D], weights [B,H,Lq,Lk]) of `attention_weights` and `attend`."""
  weights_bhqk = attention_weights(q_bqhd, k_bkhd, mask)
  return attend(weights_bhqk, v_bkhd), weights_bhqk


def _fused_projection(projections: Sequence[HeadsDense], x: Array) -> tuple[Array, ...]:
  """The outputs of several [W, heads, kv] projections of the same input, from one matmul."""
  kernels, biases = [], []
  for proj in projections:
    kernel, bias = proj.weights()
    kernels.append(kernel)
    biases.append(bias)
  kernel_wphd = jnp.stack(kernels, axis=1)   # p = which projection
  bias_phd = jnp.stack(biases, axis=0)
  x, kernel_wphd, bias_phd = nn.dtypes.promote_dtype(x, kernel_wphd, bias_phd,
                                                     dtype=projections[0].dtype)
  out_blphd = jnp.tensordot(x, kernel_wphd, axes=1) + bias_phd
  return tuple(out_blphd[..., i, :, :] for i in range(len(projections)))


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention for self-attention (`x_kv=None`) and cross-attention.

  `mask` is a bool array broadcastable to [B, heads, Lq, Lk], True = may attend. For a query
  row that may attend to no key, the attention output (before the 'out' projection) is exactly
  zero in every implementation, never NaN, so padded queries are harmless.

  stack.attention_impl: 'xla' / 'cudnn' run `jax.nn.dot_product_attention` (cudnn = flash
    attention on GPU; it supports a subset of shapes and dtypes). 'explicit' computes
    softmax(q k^T / sqrt(d)) itself (`explicit_attention`) and can `sow` the weights
    [B, heads, Lq, Lk] into 'intermediates/attention_weights' when `stack.sow_weights` is on
    (and then also takes a 'perturbations' entry of the same name: see mmfusion/explain.py).
  The width is the input's; the number of heads is `stack.num_heads`.
  """
  stack: StackOptions
  causal: bool = False

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array | None = None, mask: Array | None = None,
               pool_at: Array | None = None) -> Array | tuple[Array, Array]:
    """Attention of x_q's tokens to x_kv's (default x_q): [B,Lq,W].

    `pool_at` (int [B], self-attention only): also the output of one query per example, the
    token at that index, computed on its own: returns (outputs [B,Lq,W], pooled [B,1,W]).
    Keys and values are projected once for both. When nothing reads the first output, XLA
    drops the work of every other query (see Encoder)."""
    if pool_at is not None and x_kv is not None:
      raise ValueError('pool_at is for self-attention (x_kv=None)')
    x_kv = x_q if x_kv is None else x_kv
    width, num_heads = x_q.shape[-1], self.stack.num_heads
    if width % num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {num_heads}')
    head_dim = width // num_heads
    dtypes = dict(dtype=self.stack.dtype, param_dtype=self.stack.param_dtype,
                  quantize=self.stack.quantize)

    project_in = functools.partial(
        HeadsDense, kernel_shape=(width, num_heads, head_dim),
        kernel_axes=('embed', 'heads', 'kv'), in_dims=1, **dtypes)
    lora = lora_kwargs(self.stack)
    # No key bias: it adds q.b_k to every logit of a query alike, which softmax ignores, so
    # its gradient is zero up to round-off (and Adam would turn that round-off into updates).
    projections = [project_in(name='query', **lora('query')),
                   project_in(name='key', use_bias=False, **lora('key')),
                   project_in(name='value', **lora('value'))]
    fuse = x_kv is x_q and not self.stack.quantize
    if fuse and pool_at is None:
      # Self-attention: one matmul with the three kernels side by side feeds the matrix units
      # better than three thin ones; the params stay three separate names.
      q_bqhd, k_bkhd, v_bkhd = _fused_projection(projections, x_q)
    else:
      # With pool_at the queries stay apart, so that unread ones can be dropped.
      k_bkhd, v_bkhd = (_fused_projection(projections[1:], x_kv) if fuse else
                        (projections[1](x_kv), projections[2](x_kv)))
      q_bqhd = projections[0](x_q)
    q_bqhd, k_bkhd, v_bkhd = (checkpoint_name(constrain(t, BQHD), 'qkv')
                              for t in (q_bqhd, k_bkhd, v_bkhd))
    mask = None if mask is None else _as_4d(mask)
    out = HeadsDense(
        kernel_shape=(num_heads, head_dim, width), kernel_axes=('heads', 'kv', 'embed'),
        in_dims=2, **dtypes, **lora('out'), name='out')

    out_bqhd = self._attend(q_bqhd, k_bkhd, v_bkhd, mask)
    tokens = checkpoint_name(constrain(out(out_bqhd), ('batch', 'length', 'embed')), 'attn_out')
    if pool_at is None:
      return tokens

    # The pooled query sees the keys its token sees: the padding mask, and under causal
    # attention the keys up to its own position. Plain jnp at [B,H,1,Lk] costs next to nothing
    # on any backend (the fused kernels' masks and shapes are not needed here).
    q_b1hd = checkpoint_name(projections[0](take_tokens(x_q, pool_at)), 'qkv')
    length, pooled_mask = k_bkhd.shape[1], mask
    if mask is not None and mask.shape[2] != 1:
      raise ValueError('pool_at needs a key mask that is the same for every query '
                       f'([B or 1, 1, 1, Lk]); got shape {mask.shape}')
    if self.causal:
      seen_b11k = (jnp.arange(length)[None, :] <= pool_at[:, None])[:, None, None, :]
      pooled_mask = seen_b11k if mask is None else mask & seen_b11k
    pooled_b1hd, _ = explicit_attention(q_b1hd, k_bkhd, v_bkhd, pooled_mask)
    pooled = checkpoint_name(out(pooled_b1hd), 'attn_out')
    return tokens, constrain(pooled, ('batch', None, 'embed'))

  def _attend(self, q_bqhd: Array, k_bkhd: Array, v_bkhd: Array, mask: Array | None) -> Array:
    """softmax(q k^T / sqrt(d)) v by `stack.attention_impl`: [B,Lq,H,D]."""
    if self.stack.attention_impl == 'explicit':
      full_mask = self._full_mask(mask, q_bqhd.shape[1], k_bkhd.shape[1])
      weights_bhqk = attention_weights(q_bqhd, k_bkhd, full_mask)
      if self.stack.sow_weights:
        self.sow('intermediates', 'attention_weights', weights_bhqk)
        if not self.is_initializing():
          # A zero added to the weights ('perturbations'): the gradient of any output
          # w.r.t. it is the gradient w.r.t. the attention weights, which relevance methods
          # need (mmfusion/explain.py). Without that collection the weights pass unchanged;
          # init never creates it (its shapes would tie the variables to one input length).
          weights_bhqk = self.perturb('attention_weights', weights_bhqk)
      out_bqhd = attend(weights_bhqk, v_bkhd)
      return checkpoint_name(constrain(out_bqhd, BQHD), 'attention')

    len_q, len_k = q_bqhd.shape[1], k_bkhd.shape[1]
    if self.stack.attention_impl == 'cudnn' and mask is not None:
      q_bqhd, k_bkhd, v_bkhd, fused_mask = cudnn_masked_operands(q_bqhd, k_bkhd, v_bkhd, mask)
    else:
      fused_mask = mask
    out_bqhd = jax.nn.dot_product_attention(
        q_bqhd, k_bkhd, v_bkhd, mask=fused_mask, is_causal=self.causal,
        implementation=self.stack.attention_impl)[:, :len_q]
    if mask is not None:
      # The fused kernels give a fully-masked row the mean of all values; zero it to match
      # 'explicit'. (Without a mask every row sees at least one key, causal or not.)
      has_key_bhq1 = jnp.any(self._full_mask(mask, len_q, len_k), axis=-1, keepdims=True)
      out_bqhd = jnp.where(jnp.swapaxes(has_key_bhq1, 1, 2), out_bqhd, 0).astype(out_bqhd.dtype)
    return checkpoint_name(constrain(out_bqhd, BQHD), 'attention')

  def _full_mask(self, mask: Array | None, len_q: int, len_k: int) -> Array | None:
    """The padding mask combined with the causal one (same lower-triangle as jax's `is_causal`)."""
    if not self.causal:
      return mask
    causal_11qk = jnp.tril(jnp.ones((len_q, len_k), jnp.bool_))[None, None]
    return causal_11qk if mask is None else mask & causal_11qk
