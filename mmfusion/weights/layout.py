"""mmfusion's parameter layout for transformer stacks, ViTs and text towers, filled from other
frameworks' pieces, and position-embedding resampling.

PyTorch Linear layers compute y = x W^T + b with W [out, in]; mmfusion's kernels are [in, ...out]
(attention: query/key/value [W, heads, head_dim], out [heads, head_dim, W]). mmfusion's key
projection has no bias: a key bias adds q . b_k to every logit of a query alike, which the
softmax cancels exactly, so an imported one is dropped (and said so in the notes).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

Linear = tuple[np.ndarray, 'np.ndarray | None']     # PyTorch (weight [out, in], bias [out])
Tree = dict[str, Any]


def norm(scale: np.ndarray, bias: np.ndarray) -> Tree:
  return {'scale': scale, 'bias': bias}


def dense(linear: Linear) -> Tree:
  """A PyTorch Linear as a Dense / HeadsDense(in_dims=1) node; a missing bias becomes zeros."""
  weight, bias = linear
  return {'kernel': weight.T, 'bias': np.zeros(weight.shape[0], np.float32) if bias is None
          else bias}


def attention(q: Linear, k: Linear, v: Linear, out: Linear, heads: int) -> Tree:
  """PyTorch q/k/v/out projections [W, W] -> mmfusion's MultiHeadAttention params."""
  width = q[0].shape[1]
  if width % heads:
    raise ValueError(f'width {width} is not divisible by {heads} heads')
  head_dim = width // heads

  def project_in(linear: Linear, with_bias: bool = True) -> Tree:
    node = dense(linear)
    node['kernel'] = node['kernel'].reshape(width, heads, head_dim)
    node['bias'] = node['bias'].reshape(heads, head_dim)
    return node if with_bias else {'kernel': node['kernel']}

  projected = dense(out)
  return {'query': project_in(q), 'key': project_in(k, with_bias=False), 'value': project_in(v),
          'out': {'kernel': projected['kernel'].reshape(heads, head_dim, width),
                  'bias': projected['bias']}}


def packed_attention(in_proj: Linear, out: Linear, heads: int) -> Tree:
  """nn.MultiheadAttention's packed in_proj_weight [3W, W] (q, k, v stacked) -> attention()."""
  weight, bias = in_proj
  ws = np.split(weight, 3, axis=0)
  bs = np.split(bias, 3) if bias is not None else (None,) * 3
  return attention(*zip(ws, bs), out, heads=heads)


def block(ln_attn: Tree, attn: Tree, ln_mlp: Tree, fc1: Linear, fc2: Linear) -> Tree:
  """One pre-LN EncoderBlock: ln_attn, attn, ln_mlp, mlp/fc1, mlp/fc2."""
  return {'ln_attn': ln_attn, 'attn': attn, 'ln_mlp': ln_mlp,
          'mlp': {'fc1': dense(fc1), 'fc2': dense(fc2)}}


def encoder(blocks: Sequence[Tree], final_norm: Tree) -> Tree:
  """The unrolled Encoder layout (block_0 ... block_{depth-1}, encoder_norm)."""
  return {**{f'block_{i}': b for i, b in enumerate(blocks)}, 'encoder_norm': final_norm}


def patch_kernel(conv_weight: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight [W, 3, P, P] -> Flax Conv kernel [P, P, 3, W]."""
  return conv_weight.transpose(2, 3, 1, 0)


def grid_size(num_positions: int, what: str) -> int:
  side = int(round(num_positions ** 0.5))
  if side * side != num_positions:
    raise ValueError(f'{what}: {num_positions} positions are not a square grid of patches')
  return side


def resample_posemb(pos_nw: np.ndarray, new_side: int) -> np.ndarray:
  """A square grid of position embeddings [N, W] resampled to [new_side^2, W] by bilinear
  interpolation with the corners aligned (scipy.ndimage.zoom, order 1: what big_vision's
  `resample_posemb` does), for images of another resolution."""
  import scipy.ndimage    # noqa: PLC0415
  side = grid_size(pos_nw.shape[0], 'position embedding')
  if side == new_side:
    return pos_nw
  grid = pos_nw.reshape(side, side, -1)
  zoomed = scipy.ndimage.zoom(grid, (new_side / side, new_side / side, 1), order=1)
  return zoomed.reshape(new_side * new_side, -1).astype(pos_nw.dtype)
