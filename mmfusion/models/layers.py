"""The pieces every transformer stack is built from: the options of a stack (`StackOptions`, with
the size presets and activations), remat policies, logical-axis helpers, LayerNorm, the dense
layer with adapters (`HeadsDense`) and the MLP. Attention is in attention.py, the blocks and the
encoder stack in encoder.py. Every param and main activation carries logical axis names; the
config's rules map them to a mesh.
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


def lora_kwargs(stack: StackOptions) -> Callable[[str], dict[str, Any]]:
  """layer name -> the HeadsDense arguments of its adapter under `stack.lora` (none: {})."""
  def kwargs(layer: str) -> dict[str, Any]:
    if stack.lora is None or not stack.lora.rank_for(layer):
      return {}
    return dict(lora_rank=stack.lora.rank_for(layer), lora_scale=stack.lora.scale)
  return kwargs


class MlpBlock(nn.Module):
  """Dense -> activation -> dropout -> Dense, back to the input width (hidden: `stack.mlp_dim`)."""
  stack: StackOptions

  @nn.compact
  def __call__(self, x_ble: Array, deterministic: bool = True) -> Array:
    width = x_ble.shape[-1]
    lora = lora_kwargs(self.stack)
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


def remat_module(module_cls: type[nn.Module], stack: StackOptions, deterministic_argnum: int,
                 prevent_cse: bool = True) -> type[nn.Module]:
  """`module_cls` wrapped for `stack.remat` (unchanged for 'none'); `deterministic_argnum`
  counts the module itself as 0 and names the Python-bool argument, which must be static."""
  if stack.remat == 'none':
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(stack.remat, stack.remat_save),
                  static_argnums=(deterministic_argnum,), prevent_cse=prevent_cse)
