"""Pre-LN transformer pieces shared by every tower, fusion module and decoder: the options of a
stack (`StackOptions`, with the size presets), attention (self and cross), MLP, block, encoder.
Every param and main activation carries logical axis names; the config's rules map them to a mesh.
(~490 lines: every piece the stacks share, so that none of them is written twice.)
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfusion.models.adapters import (  # noqa: F401  (re-exported: the layers' options)
    LORA_PARAMS, LORA_TARGETS, QUANTIZE, LoraOptions, aqt_dot_general, lora_merged)

Array = jax.Array
Dtype = Any

# The logical axis names model code may use. Sharding rules in the config map them to mesh
# axes; a name missing from the rules leaves that dimension replicated.
LOGICAL_AXES = ('batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab', 'layers', 'classes')
ATTENTION_IMPLS = ('xla', 'cudnn', 'explicit')
REMAT_POLICIES = ('none', 'full', 'save_dots', 'named')
# Activations tagged with `checkpoint_name`, which remat='named' can keep instead of recomputing:
#   qkv        the query/key/value projections [B,L,heads,kv] (three arrays)
#   attention  softmax(q k^T) v before the output projection [B,L,heads,kv]
#   attn_out   the attention block's output projection [B,L,W]
#   mlp_hidden the first MLP matmul, before the GELU [B,L,mlp]
#   mlp_out    the second MLP matmul [B,L,W]
CHECKPOINT_NAMES = ('qkv', 'attention', 'attn_out', 'mlp_hidden', 'mlp_out')
# The MLP's non-linearity: GELU's tanh approximation (ViT, big_vision, SigLIP; the default), exact
# GELU (open_clip's own models) and OpenAI CLIP's x * sigmoid(1.702 x).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu_tanh': functools.partial(nn.gelu, approximate=True),
    'gelu_erf': functools.partial(nn.gelu, approximate=False),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
}

_default_kernel_init = nn.initializers.xavier_uniform()

# Size presets by name -> (width, depth, mlp_dim, num_heads), as in "An Image is Worth 16x16
# Words" and big_vision. A tower's `variant` names one, optionally with '/<patch size>'.
SIZES: dict[str, tuple[int, int, int, int]] = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}


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


@dataclasses.dataclass(frozen=True)
class StackOptions:
  """What every transformer stack shares: its sizes and how it computes.

  One instance configures a whole tower, fusion module or decoder and is handed down to its
  blocks, attentions and MLPs, so no module repeats these fields. `attention_impl`, `remat` and
  `scan_layers` change speed and memory, never the maths; `sow_weights` records attention
  weights (needs attention_impl='explicit'); `lora` adds low-rank adapters to its projections.
  `activation` (ACTIVATIONS) and `norm_eps` (the LayerNorms' epsilon) are there for weights
  trained elsewhere: OpenAI CLIP uses quick_gelu and 1e-5.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_impl: str = 'xla'
  sow_weights: bool = False
  remat: str = 'none'
  remat_save: tuple[str, ...] = ()
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraOptions | None = None
  quantize: str = ''
  activation: str = 'gelu_tanh'
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.width <= 0 or self.depth < 0 or self.mlp_dim <= 0 or self.num_heads <= 0:
      raise ValueError(f'width={self.width}, depth={self.depth}, mlp_dim={self.mlp_dim} and '
                       f'num_heads={self.num_heads} must be positive (depth may be 0)')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}')
    if self.sow_weights and self.attention_impl != 'explicit':
      raise ValueError("sow_weights needs attention_impl='explicit' (the fused kernels never "
                       f'materialise the weights); got attention_impl={self.attention_impl!r}')
    remat_policy(self.remat, self.remat_save)   # validates both
    if self.quantize not in QUANTIZE:
      raise ValueError(f'quantize={self.quantize!r}; expected one of {QUANTIZE}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout={self.dropout} must be in [0, 1)')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}')
    if not 0.0 < self.norm_eps < 1.0:
      raise ValueError(f'norm_eps={self.norm_eps} must be in (0, 1)')

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def replace(self, **changes: Any) -> 'StackOptions':
    return dataclasses.replace(self, **changes)


def resolve_attention_impl(name: str, dtype: Dtype, head_dim: int) -> str:
  """'auto' -> 'cudnn' (fused flash attention) where cuDNN can run it: a GPU backend, 16-bit
  compute and a head dim that is a multiple of 8 up to 128; else 'xla'. Other names pass."""
  if name != 'auto':
    return name
  fused_ok = (jax.default_backend() == 'gpu' and jnp.dtype(dtype).itemsize == 2
              and head_dim % 8 == 0 and head_dim <= 128)
  return 'cudnn' if fused_ok else 'xla'


def remat_policy(remat: str, save_names: Sequence[str] = ()):
  """The `jax.checkpoint` policy for a remat mode; None for remat='none' (no checkpointing).

  full: nothing saved, every activation of a block is recomputed (least memory).
  save_dots: the outputs of matmuls with parameters are kept; attention scores, softmax and
    element-wise ops are recomputed (a good default when memory is tight).
  named: only the activations tagged with the names in `save_names` (see CHECKPOINT_NAMES).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r}; expected one of {REMAT_POLICIES}')
  unknown = set(save_names) - set(CHECKPOINT_NAMES)
  if unknown:
    raise ValueError(f'remat_save names {sorted(unknown)}; tagged activations are {CHECKPOINT_NAMES}')
  if remat == 'none':
    return None
  if remat == 'full':
    return jax.checkpoint_policies.nothing_saveable
  if remat == 'save_dots':
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return jax.checkpoint_policies.save_only_these_names(*save_names)


def named_init(init_fn, names: Sequence[str | None]):
  """`init_fn` whose output is boxed with logical axis names (one per parameter dim)."""
  return nn.with_logical_partitioning(init_fn, tuple(names))


def constrain(x: Array, names: Sequence[str | None]) -> Array:
  """Logical sharding constraint; a no-op unless logical axis rules are active."""
  return nn.with_logical_constraint(x, tuple(names))


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str, epsilon: float = 1e-6
               ) -> nn.LayerNorm:
  # Flax computes the statistics in float32 even when `dtype` is bfloat16.
  return nn.LayerNorm(
      dtype=dtype, param_dtype=param_dtype, name=name, epsilon=epsilon,
      scale_init=named_init(nn.initializers.ones, ('embed',)),
      bias_init=named_init(nn.initializers.zeros, ('embed',)))


def stack_norm(stack: StackOptions, name: str) -> nn.LayerNorm:
  """A LayerNorm of `stack` (its dtypes and epsilon)."""
  return layer_norm(stack.dtype, stack.param_dtype, name, stack.norm_eps)


BQHD = ('batch', 'length', 'heads', 'kv')   # logical axes of queries, keys, values per head


def take_tokens(x_blw: Array, index_b: Array) -> Array:
  """The token at `index_b` (int [B]) of each example: [B,1,W]."""
  return jnp.take_along_axis(x_blw, index_b[:, None, None].astype(jnp.int32), axis=1)


def _as_4d(mask: Array) -> Array:
  """Prepends unit dims (numpy broadcasting) so a mask is 4-D, as the attention kernels need."""
  if mask.ndim > 4:
    raise ValueError(f'attention mask must broadcast to [B, heads, Lq, Lk]; got shape {mask.shape}')
  return mask.astype(jnp.bool_).reshape((1,) * (4 - mask.ndim) + mask.shape)


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


class HeadsDense(nn.Module):
  """y = x . kernel + bias, contracting x's last `in_dims` dims with the kernel's first ones.

  Used for the attention projections instead of nn.DenseGeneral, whose initialiser sees a
  flattened 2-D kernel: under a mesh, the 3 logical names then meet a 2-D array and fail.
  Fans are computed as DenseGeneral does (in = contracted dims, out = the rest).
  """
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_dims: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Array] | None = None     # default: xavier_uniform over the fans
  bias_init: Callable[..., Array] = nn.initializers.zeros
  lora_rank: int = 0                                  # > 0: a low-rank adapter (LoraOptions)
  lora_scale: float = 1.0
  quantize: str = ''                                  # 'int8': AQT's int8 matmul (QUANTIZE)

  def setup(self):
    ndim, k = len(self.kernel_shape), self.in_dims
    in_axes, out_axes = tuple(range(k)), tuple(range(k, ndim))
    kernel_init = self.kernel_init or nn.initializers.xavier_uniform(in_axis=in_axes,
                                                                     out_axis=out_axes)
    self.kernel = self.param('kernel', named_init(kernel_init, self.kernel_axes),
                             self.kernel_shape, self.param_dtype)
    out_shape = self.kernel_shape[k:]
    if self.use_bias:
      self.bias = self.param('bias', named_init(self.bias_init, self.kernel_axes[k:]),
                             out_shape, self.param_dtype)
    else:
      self.bias = jnp.zeros(out_shape, self.param_dtype)
    if self.lora_rank:
      r = self.lora_rank
      a_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=in_axes,
                                                out_axis=-1)
      self.lora_a = self.param('lora_a', named_init(a_init, (*self.kernel_axes[:k], None)),
                               (*self.kernel_shape[:k], r), self.param_dtype)
      self.lora_b = self.param('lora_b', named_init(nn.initializers.zeros,
                                                    (None, *self.kernel_axes[k:])),
                               (r, *out_shape), self.param_dtype)
    if self.quantize:
      self.dot_general = aqt_dot_general(self.quantize)

  def weights(self) -> tuple[Array, Array]:
    """(kernel, bias); the bias is zeros when the layer has none. With an adapter the kernel
    is W + scale * A B (exactly W while B is zero); `merge_lora` writes the same sum."""
    kernel = self.kernel
    if self.lora_rank:
      kernel = lora_merged(kernel, self.lora_a, self.lora_b, self.lora_scale)
    return kernel, self.bias

  def __call__(self, x: Array) -> Array:
    x, kernel, bias = nn.dtypes.promote_dtype(x, *self.weights(), dtype=self.dtype)
    if self.quantize:
      k = self.in_dims
      contract = ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ()))
      return self.dot_general(x, kernel, contract, None) + bias
    return jnp.tensordot(x, kernel, axes=self.in_dims) + bias


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


def _lora_kwargs(stack: StackOptions) -> Callable[[str], dict[str, Any]]:
  """layer name -> the HeadsDense arguments of its adapter under `stack.lora` (none: {})."""
  def kwargs(layer: str) -> dict[str, Any]:
    if stack.lora is None or not stack.lora.rank_for(layer):
      return {}
    return dict(lora_rank=stack.lora.rank_for(layer), lora_scale=stack.lora.scale)
  return kwargs


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
    lora = _lora_kwargs(self.stack)
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
    else:
      out_bqhd = jax.nn.dot_product_attention(
          q_bqhd, k_bkhd, v_bkhd, mask=mask, is_causal=self.causal,
          implementation=self.stack.attention_impl)
      if mask is not None:
        # The fused kernels give a fully-masked row the mean of all values; zero it to match
        # 'explicit'. (Without a mask every row sees at least one key, causal or not.)
        has_key_bhq1 = jnp.any(self._full_mask(mask, q_bqhd.shape[1], k_bkhd.shape[1]),
                               axis=-1, keepdims=True)
        out_bqhd = jnp.where(jnp.swapaxes(has_key_bhq1, 1, 2), out_bqhd, 0).astype(out_bqhd.dtype)
    return checkpoint_name(constrain(out_bqhd, BQHD), 'attention')

  def _full_mask(self, mask: Array | None, len_q: int, len_k: int) -> Array | None:
    """The padding mask combined with the causal one (same lower-triangle as jax's `is_causal`)."""
    if not self.causal:
      return mask
    causal_11qk = jnp.tril(jnp.ones((len_q, len_k), jnp.bool_))[None, None]
    return causal_11qk if mask is None else mask & causal_11qk


class MlpBlock(nn.Module):
  """Dense -> activation -> dropout -> Dense, back to the input width (hidden: `stack.mlp_dim`)."""
  stack: StackOptions

  @nn.compact
  def __call__(self, x_ble: Array, deterministic: bool = True) -> Array:
    width = x_ble.shape[-1]
    lora = _lora_kwargs(self.stack)
    dense = functools.partial(
        HeadsDense, in_dims=1, dtype=self.stack.dtype, param_dtype=self.stack.param_dtype,
        quantize=self.stack.quantize, kernel_init=_default_kernel_init, bias_init=nn.initializers.normal(stddev=1e-6))
    h_blm = dense(kernel_shape=(width, self.stack.mlp_dim), kernel_axes=('embed', 'mlp'),
                  **lora('fc1'), name='fc1')(x_ble)
    h_blm = checkpoint_name(h_blm, 'mlp_hidden')
    h_blm = constrain(ACTIVATIONS[self.stack.activation](h_blm), ('batch', 'length', 'mlp'))
    h_blm = nn.Dropout(self.stack.dropout)(h_blm, deterministic)
    out = dense(kernel_shape=(self.stack.mlp_dim, width), kernel_axes=('mlp', 'embed'),
                **lora('fc2'), name='fc2')(h_blm)
    return checkpoint_name(constrain(out, ('batch', 'length', 'embed')), 'mlp_out')


class EncoderBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)).

  The call signature `(x, mask, deterministic) -> x` is what `nn.scan` over layers needs
  (x is the carry, mask and deterministic are broadcast), so scanning changes only the
  param layout (a leading 'layers' axis), not the maths. With `pool_at` (int [B]) it returns
  (x, the token at pool_at computed on its own [B,W]): see Encoder.
  """
  stack: StackOptions
  causal: bool = False

  @nn.compact
  def __call__(self, x_ble: Array, mask: Array | None = None,
               deterministic: bool = True, pool_at: Array | None = None
               ) -> Array | tuple[Array, Array]:
    stack = self.stack
    x_ble = constrain(x_ble, ('batch', 'length', 'embed'))
    attn = MultiHeadAttention(stack, causal=self.causal, name='attn')
    ln_mlp, mlp = stack_norm(stack, 'ln_mlp'), MlpBlock(stack, name='mlp')

    def add_mlp(x):
      return x + nn.Dropout(stack.dropout)(mlp(ln_mlp(x), deterministic), deterministic)

    y = stack_norm(stack, 'ln_attn')(x_ble)
    if pool_at is None:
      x_ble = x_ble + nn.Dropout(stack.dropout)(attn(y, mask=mask), deterministic)
      return constrain(add_mlp(x_ble), ('batch', 'length', 'embed'))
    y_ble, y_b1e = attn(y, mask=mask, pool_at=pool_at)
    x_b1e = take_tokens(x_ble, pool_at) + nn.Dropout(stack.dropout)(y_b1e, deterministic)
    x_ble = add_mlp(x_ble + nn.Dropout(stack.dropout)(y_ble, deterministic))
    return constrain(x_ble, ('batch', 'length', 'embed')), add_mlp(x_b1e)[:, 0]


class _ScanStep(EncoderBlock):
  """EncoderBlock in the `(carry, *xs) -> (carry, ys)` form that `nn.scan` iterates."""

  def __call__(self, x_ble: Array, mask: Array | None, deterministic: bool):
    return super().__call__(x_ble, mask, deterministic), None


SCANNED_BLOCKS = 'blocks'   # Encoder's param name for the stacked blocks when scan_layers


def remat_module(module_cls: type[nn.Module], stack: StackOptions, deterministic_argnum: int,
                 prevent_cse: bool = True) -> type[nn.Module]:
  """`module_cls` wrapped for `stack.remat` (unchanged for 'none'); `deterministic_argnum`
  counts the module itself as 0 and names the Python-bool argument, which must be static."""
  if stack.remat == 'none':
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(stack.remat, stack.remat_save),
                  static_argnums=(deterministic_argnum,), prevent_cse=prevent_cse)


class Encoder(nn.Module):
  """`stack.depth` EncoderBlocks and a final LayerNorm ('encoder_norm').

  Param layouts: unrolled, the blocks are 'block_0' ... 'block_{depth-1}'; with
  `stack.scan_layers` they are one 'blocks' sub-tree whose leaves have a leading [depth] axis
  (logical name 'layers'), and the stack is an `nn.scan`, so the step compiles one block however
  deep the tower is. Both give the same outputs; `scan_layout` / `unscan_layout` convert params.

  stack.remat: see `remat_policy` ('none' | 'full' | 'save_dots' | 'named' with `remat_save`).
  Recomputing in the backward pass changes memory and speed, never params or outputs.

  `pool_at` (int [B]): the index of the token a tower pools (cls, EOS); the call then returns
  (tokens [B,L,W], pooled [B,W]), pooled being the normed token at pool_at. The last block
  computes the pooled token on its own, beside all the tokens: a loss that reads only the
  pooled token (CLIP's, SigLIP's) leaves the tokens' queries, attention and MLP in that block
  unread, and XLA drops them, forward and backward (about 10/12 of the block's FLOPs). When
  the tokens are read too (fusion, captioning), the extra work is one token per example.
  Scanned stacks, recorded attention weights and dropout in training take the pooled token
  from the tokens instead (the last block is inside the scan; the weights must cover every
  query; dropout masks must agree).
  """
  stack: StackOptions
  causal: bool = False

  @nn.compact
  def __call__(self, x_ble: Array, mask: Array | None = None,
               deterministic: bool = True, pool_at: Array | None = None
               ) -> Array | tuple[Array, Array]:
    stack = self.stack
    block_cls = _ScanStep if stack.scan_layers else EncoderBlock
    # Under scan, XLA cannot merge the recomputation into the forward pass anyway, so the CSE
    # barrier that remat adds by default is only needed unrolled.
    block_cls = remat_module(block_cls, stack, 3, prevent_cse=not stack.scan_layers)
    pooled_apart = (pool_at is not None and stack.depth > 0 and not stack.scan_layers
                    and not stack.sow_weights and (deterministic or stack.dropout == 0.0))
    pooled_bw = None
    if stack.scan_layers and stack.depth:
      scanned = nn.scan(
          block_cls, length=stack.depth,
          variable_axes={'params': 0, 'intermediates': 0, 'perturbations': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast),
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x_ble, _ = scanned(stack, self.causal, name=SCANNED_BLOCKS)(x_ble, mask, deterministic)
    else:
      for i in range(stack.depth):
        block = block_cls(stack, self.causal, name=f'block_{i}')
        if pooled_apart and i == stack.depth - 1:
          x_ble, pooled_bw = block(x_ble, mask, deterministic, pool_at)
        else:
          x_ble = block(x_ble, mask, deterministic)
    norm = stack_norm(stack, 'encoder_norm')
    if pool_at is None:
      return norm(x_ble)
    pooled_bw = take_tokens(x_ble, pool_at)[:, 0] if pooled_bw is None else pooled_bw
    return norm(x_ble), norm(pooled_bw)
