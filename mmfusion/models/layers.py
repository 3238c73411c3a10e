"""Pre-LN transformer pieces shared by every tower: attention (self and cross), MLP, block, encoder.
Every param and main activation carries logical axis names; the config's rules map them to a mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# The logical axis names model code may use. Sharding rules in the config map them to mesh
# axes; a name missing from the rules leaves that dimension replicated.
LOGICAL_AXES = ('batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab', 'layers', 'classes')
ATTENTION_IMPLS = ('xla', 'cudnn', 'explicit')
REMAT_POLICIES = ('none', 'full')

_default_kernel_init = nn.initializers.xavier_uniform()


def named_init(init_fn, names: Sequence[str | None]):
  """`init_fn` whose output is boxed with logical axis names (one per parameter dim)."""
  return nn.with_logical_partitioning(init_fn, tuple(names))


def constrain(x: Array, names: Sequence[str | None]) -> Array:
  """Logical sharding constraint; a no-op unless logical axis rules are active."""
  return nn.with_logical_constraint(x, tuple(names))


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  # Flax computes the statistics in float32 even when `dtype` is bfloat16.
  return nn.LayerNorm(
      dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=named_init(nn.initializers.ones, ('embed',)),
      bias_init=named_init(nn.initializers.zeros, ('embed',)))


def _as_4d(mask: Array) -> Array:
  """Prepends unit dims (numpy broadcasting) so a mask is 4-D, as the attention kernels need."""
  if mask.ndim > 4:
    raise ValueError(f'attention mask must broadcast to [B, heads, Lq, Lk]; got shape {mask.shape}')
  return mask.astype(jnp.bool_).reshape((1,) * (4 - mask.ndim) + mask.shape)


class HeadsDense(nn.Module):
  """y = x . kernel + bias, contracting x's last `in_dims` dims with the kernel's first ones.

  Used for the attention projections instead of nn.DenseGeneral, whose initialiser sees a
  flattened 2-D kernel: under a mesh, the 3 logical names then meet a 2-D array and fail.
  Fans are computed as DenseGeneral does (in = contracted dims, out = the rest).
  """
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_dims: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ndim = len(self.kernel_shape)
    kernel_init = nn.initializers.xavier_uniform(
        in_axis=tuple(range(self.in_dims)), out_axis=tuple(range(self.in_dims, ndim)))
    kernel = self.param('kernel', named_init(kernel_init, self.kernel_axes), self.kernel_shape,
                        self.param_dtype)
    bias = self.param('bias', named_init(nn.initializers.zeros, self.kernel_axes[self.in_dims:]),
                      self.kernel_shape[self.in_dims:], self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.tensordot(x, kernel, axes=self.in_dims) + bias


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention for self-attention (`x_kv=None`) and cross-attention.

  `mask` is a bool array broadcastable to [B, heads, Lq, Lk], True = may attend. For a query
  row that may attend to no key, the attention output (before the 'out' projection) is exactly
  zero in every implementation, never NaN, so padded queries are harmless.

  attention_impl: 'xla' / 'cudnn' run `jax.nn.dot_product_attention` (cudnn = flash attention on
    GPU; it supports a subset of shapes and dtypes). 'explicit' computes softmax(q k^T / sqrt(d))
    itself and can `sow` the weights [B, heads, Lq, Lk] into 'intermediates/attention_weights'
    when `sow_weights` is on, for visualisation.
  """
  num_heads: int
  causal: bool = False
  attention_impl: str = 'xla'
  sow_weights: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}')
    if self.sow_weights and self.attention_impl != 'explicit':
      raise ValueError("sow_weights needs attention_impl='explicit' (the fused kernels never "
                       f'materialise the weights); got attention_impl={self.attention_impl!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array | None = None, mask: Array | None = None) -> Array:
    x_kv = x_q if x_kv is None else x_kv
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads

    project_in = functools.partial(
        HeadsDense, kernel_shape=(width, self.num_heads, head_dim),
        kernel_axes=('embed', 'heads', 'kv'), in_dims=1,
        dtype=self.dtype, param_dtype=self.param_dtype)
    bqhd = ('batch', 'length', 'heads', 'kv')
    q_bqhd = constrain(project_in(name='query')(x_q), bqhd)
    k_bkhd = constrain(project_in(name='key')(x_kv), bqhd)
    v_bkhd = constrain(project_in(name='value')(x_kv), bqhd)

    mask = None if mask is None else _as_4d(mask)
    if self.attention_impl == 'explicit':
      out_bqhd = self._explicit_attention(q_bqhd, k_bkhd, v_bkhd, mask)
    else:
      out_bqhd = jax.nn.dot_product_attention(
          q_bqhd, k_bkhd, v_bkhd, mask=mask, is_causal=self.causal,
          implementation=self.attention_impl)
      if mask is not None:
        # The fused kernels give a fully-masked row the mean of all values; zero it to match
        # 'explicit'. (Without a mask every row sees at least one key, causal or not.)
        has_key_bhq1 = jnp.any(self._full_mask(mask, q_bqhd.shape[1], k_bkhd.shape[1]),
                               axis=-1, keepdims=True)
        out_bqhd = jnp.where(jnp.swapaxes(has_key_bhq1, 1, 2), out_bqhd, 0).astype(out_bqhd.dtype)
    out_bqhd = constrain(out_bqhd, bqhd)

    out = HeadsDense(
        kernel_shape=(self.num_heads, head_dim, width), kernel_axes=('heads', 'kv', 'embed'),
        in_dims=2, dtype=self.dtype, param_dtype=self.param_dtype, name='out')(out_bqhd)
    return constrain(out, ('batch', 'length', 'embed'))

  def _full_mask(self, mask: Array | None, len_q: int, len_k: int) -> Array | None:
    """The padding mask combined with the causal one (same lower-triangle as jax's `is_causal`)."""
    if not self.causal:
      return mask
    causal_11qk = jnp.tril(jnp.ones((len_q, len_k), jnp.bool_))[None, None]
    return causal_11qk if mask is None else mask & causal_11qk

  def _explicit_attention(self, q_bqhd: Array, k_bkhd: Array, v_bkhd: Array,
                          mask: Array | None) -> Array:
    scale = q_bqhd.shape[-1] ** -0.5
    logits_bhqk = jnp.einsum('bqhd,bkhd->bhqk', q_bqhd, k_bkhd,
                             preferred_element_type=jnp.float32) * scale
    mask = self._full_mask(mask, q_bqhd.shape[1], k_bkhd.shape[1])
    if mask is None:
      weights_bhqk = jax.nn.softmax(logits_bhqk, axis=-1)
    else:
      logits_bhqk = jnp.where(mask, logits_bhqk, jnp.finfo(jnp.float32).min)
      # `where` after the softmax makes masked weights exactly 0, and turns the uniform
      # weights of a fully-masked row into zeros (never NaN: the row max is finite).
      weights_bhqk = jnp.where(mask, jax.nn.softmax(logits_bhqk, axis=-1), 0.0)
    if self.sow_weights:
      self.sow('intermediates', 'attention_weights', weights_bhqk)
    return jnp.einsum('bhqk,bkhd->bqhd', weights_bhqk.astype(v_bkhd.dtype), v_bkhd)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense, back to the input width."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_ble: Array, deterministic: bool = True) -> Array:
    width = x_ble.shape[-1]
    h_blm = nn.Dense(
        self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=named_init(_default_kernel_init, ('embed', 'mlp')),
        bias_init=named_init(nn.initializers.normal(stddev=1e-6), ('mlp',)), name='fc1')(x_ble)
    h_blm = constrain(nn.gelu(h_blm), ('batch', 'length', 'mlp'))
    h_blm = nn.Dropout(self.dropout)(h_blm, deterministic)
    out = nn.Dense(
        width, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=named_init(_default_kernel_init, ('mlp', 'embed')),
        bias_init=named_init(nn.initializers.normal(stddev=1e-6), ('embed',)), name='fc2')(h_blm)
    return constrain(out, ('batch', 'length', 'embed'))


class EncoderBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)).

  The call signature `(x, mask, deterministic) -> x` is what `nn.scan` over layers needs
  (x is the carry, mask and deterministic are broadcast), so scanning later changes only
  the param layout (a leading 'layers' axis), not the maths.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  causal: bool = False
  attention_impl: str = 'xla'
  sow_weights: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_ble: Array, mask: Array | None = None,
               deterministic: bool = True) -> Array:
    x_ble = constrain(x_ble, ('batch', 'length', 'embed'))
    y = layer_norm(self.dtype, self.param_dtype, 'ln_attn')(x_ble)
    y = MultiHeadAttention(
        num_heads=self.num_heads, causal=self.causal, attention_impl=self.attention_impl,
        sow_weights=self.sow_weights, dtype=self.dtype, param_dtype=self.param_dtype,
        name='attn')(y, mask=mask)
    x_ble = x_ble + nn.Dropout(self.dropout)(y, deterministic)

    y = layer_norm(self.dtype, self.param_dtype, 'ln_mlp')(x_ble)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name='mlp')(
        y, deterministic)
    x_ble = x_ble + nn.Dropout(self.dropout)(y, deterministic)
    return constrain(x_ble, ('batch', 'length', 'embed'))


class Encoder(nn.Module):
  """`depth` EncoderBlocks ('block_0' ... 'block_{depth-1}') and a final LayerNorm ('encoder_norm').

  remat='full' recomputes each block's activations in the backward pass (same params, same
  outputs, less memory). Layers are unrolled; scanning them is planned and will stack the
  blocks' params under one name with a leading 'layers' axis.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  causal: bool = False
  attention_impl: str = 'xla'
  sow_weights: bool = False
  remat: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r}; expected one of {REMAT_POLICIES}')
    if self.depth < 0:
      raise ValueError(f'depth must be >= 0; got {self.depth}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x_ble: Array, mask: Array | None = None,
               deterministic: bool = True) -> Array:
    block_cls = EncoderBlock
    if self.remat == 'full':
      # argnum 0 is the module itself, so 3 is `deterministic` (a Python bool: must be static).
      block_cls = nn.remat(EncoderBlock, static_argnums=(3,))
    for i in range(self.depth):
      x_ble = block_cls(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
          causal=self.causal, attention_impl=self.attention_impl, sow_weights=self.sow_weights,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f'block_{i}')(
              x_ble, mask, deterministic)
    return layer_norm(self.dtype, self.param_dtype, 'encoder_norm')(x_ble)
