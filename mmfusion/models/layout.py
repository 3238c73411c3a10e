"""Param layouts of stacked blocks: unrolled ('block_0' ... 'block_{n-1}') and scanned (one
'blocks' sub-tree with a leading [depth] axis), and the conversions between them that
checkpoints need when `config.model.scan_layers` differs from the run that wrote them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmfusion.models.encoder import SCANNED_BLOCKS


def _is_unrolled(tree: Any) -> bool:
  return isinstance(tree, Mapping) and 'block_0' in tree


def scan_layout(params: Any) -> Any:
  """Unrolled -> scanned params: every {'block_0', ..., 'block_{n-1}'} group (in any sub-tree)
  becomes {'blocks': leaves stacked on a new leading axis}. Other entries are kept; trees that
  are already scanned pass through. Works on numpy and jax arrays."""
  if not isinstance(params, Mapping):
    return params
  out = {}
  blocks = sorted((k for k in params if re.fullmatch(r'block_\d+', k)),
                  key=lambda k: int(k.split('_')[1]))
  if blocks:
    expected = [f'block_{i}' for i in range(len(blocks))]
    if blocks != expected:
      raise ValueError(f'cannot stack blocks {blocks}: expected {expected} (a gap in the numbering)')
    if SCANNED_BLOCKS in params:
      raise ValueError(f"params have both '{SCANNED_BLOCKS}' and 'block_i' entries")
    out[SCANNED_BLOCKS] = jax.tree.map(lambda *xs: _stack(xs), *[params[k] for k in blocks])
  for key, value in params.items():
    if key not in blocks:
      out[key] = scan_layout(value)
  return out


def unscan_layout(params: Any) -> Any:
  """Scanned -> unrolled params: the inverse of `scan_layout`."""
  if not isinstance(params, Mapping):
    return params
  out = {}
  for key, value in params.items():
    if key == SCANNED_BLOCKS:
      depths = {x.shape[0] for x in jax.tree.leaves(value)}
      if len(depths) != 1:
        raise ValueError(f"'{SCANNED_BLOCKS}' leaves disagree on the number of layers: {depths}")
      for i in range(depths.pop()):
        out[f'block_{i}'] = jax.tree.map(lambda x, i=i: x[i], value)
    else:
      out[key] = unscan_layout(value)
  return out


def is_scanned(params: Any) -> bool | None:
  """True / False if the tree holds scanned / unrolled blocks; None if it holds no blocks."""
  found = set()

  def visit(tree):
    if isinstance(tree, Mapping):
      if SCANNED_BLOCKS in tree:
        found.add(True)
      if _is_unrolled(tree):
        found.add(False)
      for value in tree.values():
        visit(value)
  visit(params)
  if len(found) > 1:
    raise ValueError('params mix scanned and unrolled blocks')
  return found.pop() if found else None


def match_layout(params: Any, like: Any) -> Any:
  """`params` converted to the scanned/unrolled layout of `like` (unchanged if they agree)."""
  target, source = is_scanned(like), is_scanned(params)
  if target is None or source is None or target == source:
    return params
  return scan_layout(params) if target else unscan_layout(params)


def _stack(xs):
  if isinstance(xs[0], jax.Array):
    return jnp.stack(xs)
  return np.stack([np.asarray(x) for x in xs])
