"""The pre-LN encoder stack: `EncoderBlock` (attention, then MLP, each with a residual) and
`Encoder` (`depth` blocks, unrolled or as one `nn.scan`, under a remat policy, and a final
LayerNorm), which can compute the pooled token of its last block apart (`pool_at`).
"""
from __future__ import annotations

import flax.linen as nn
import jax

from mmfusion.models.attention import MultiHeadAttention, take_tokens
from mmfusion.models.layers import MlpBlock, StackOptions, constrain, remat_module, stack_norm

Array = jax.Array


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
