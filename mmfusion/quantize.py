"""int8 weight quantisation of a trained run, for storage and inference.

  python -m mmfusion.quantize --workdir workdirs/shapes_clip --out workdirs/shapes_clip_int8

Every float kernel and embedding table (a leaf of two or more dims, not counting a scanned
stack's layer axis) is stored as int8 with one float32 scale per output channel (its last
axis; per layer in a scanned stack): q = round(w / s), s = max|w| / 127 over the other axes,
symmetric, so zero stays zero. Biases, norms and the temperature stay float32. The checkpoint
holds the int8 leaves under `params` and the scales under `int8_scales`;
`checkpoint.load_params` dequantises on the way in, so `mmfusion.load_run`, `init_from` and the
evaluators read such a workdir like any other. The command then runs the run's own evaluators
on the float32 and the int8 parameters and prints both, with the parameter bytes of each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCALES = 'int8_scales'      # the checkpoint item next to `params` that marks an int8 checkpoint


def _reduced_axes(value: np.ndarray, names: Sequence[str | None] | None) -> tuple[int, ...]:
  """The axes one scale covers: all but the last (the output channel) and a 'layers' axis."""
  keep = {value.ndim - 1}
  if names is not None:
    keep |= {i for i, n in enumerate(names) if n == 'layers'}
  return tuple(i for i in range(value.ndim) if i not in keep)


def quantize(params: Mapping[str, Any], axis_names: Mapping[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params with int8 leaves, {path of each int8 leaf: its float32 scales}) as nested dicts.
  `axis_names`: the params' logical axis names (a scanned stack's 'layers' axis keeps a
  scale per layer); without them every axis but the last is covered by one scale."""
  out, scales = {}, {}
  for name, value in params.items():
    names = (axis_names or {}).get(name) if isinstance(axis_names, Mapping) else None
    if isinstance(value, Mapping):
      out[name], sub = quantize(value, names if isinstance(names, Mapping) else None)
      if sub:
        scales[name] = sub
      continue
    value = np.asarray(value)
    axes = _reduced_axes(value, names if isinstance(names, (tuple, list)) else None)
    if not np.issubdtype(value.dtype, np.floating) or not axes:
      out[name] = value
      continue
    scale = np.abs(value).max(axis=axes, keepdims=True).astype(np.float32) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    out[name] = np.clip(np.round(value / scale), -127, 127).astype(np.int8)
    scales[name] = scale
  return out, scales


def dequantize(params: Mapping[str, Any], scales: Mapping[str, Any]) -> dict[str, Any]:
  """The float32 parameters of `quantize`'s output."""
  out = {}
  for name, value in params.items():
    if isinstance(value, Mapping):
      out[name] = dequantize(value, scales.get(name, {}))
    elif name in scales:
      out[name] = np.asarray(value).astype(np.float32) * np.asarray(scales[name], np.float32)
    else:
      out[name] = value
  return out


def nbytes(tree: Any) -> int:
  import jax
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def export(workdir: str, out: str, step: int | None = None, data_dir: str | None = None
           ) -> tuple[str, int, int]:
  """Writes the int8 checkpoint of `workdir` (newest, or `step`) into a new workdir `out`;
  returns (its step directory, parameter bytes in float32, in int8 with the scales)."""
  import flax.linen as nn
  import jax

  from mmfusion import api
  from mmfusion import checkpoint as ckpt_lib
  from mmfusion import train
  step_dir = api.step_dir(workdir, step)
  if os.path.exists(os.path.join(out, ckpt_lib.CHECKPOINT_SUBDIR)):
    raise api.RunError(f'{out} already holds checkpoints; give an empty directory.')
  run = api.load_run(workdir, step=step, data_dir=data_dir)
  boxed = jax.eval_shape(run.model.init, jax.random.key(0), train.init_batch(run.config))
  names = jax.tree.map(tuple, nn.get_partition_spec(boxed)['params'],
                       is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  original = ckpt_lib.load_params(step_dir)
  params, scales = quantize(original, names)
  with open(os.path.join(step_dir, 'meta', 'metadata')) as f:
    meta = json.load(f)
  meta['quantized_from'] = os.path.abspath(step_dir)
  written = ckpt_lib.write_workdir(out, int(os.path.basename(step_dir)),
                                   {'params': params, SCALES: scales}, run.config, meta)
  return written, nbytes(original), nbytes(params) + nbytes(scales)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m mmfusion.quantize',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a trained run')
  parser.add_argument('--out', required=True, help='where the int8 workdir goes')
  parser.add_argument('--step', type=int, default=None, help='default: the newest checkpoint')
  parser.add_argument('--data_dir', default=None,
                      help='where the run\'s dataset lives, if not where it was trained')
  parser.add_argument('--no_eval', action='store_true', help='skip evaluating both')
  args = parser.parse_args(argv)
  from mmfusion import api
  try:
    written, float_bytes, int8_bytes = export(args.workdir, args.out, args.step, args.data_dir)
    print(f'int8 checkpoint of {args.workdir}: {written}; parameter bytes {float_bytes:,} in '
          f'float32, {int8_bytes:,} in int8 with the scales ({int8_bytes / float_bytes:.3f}x)')
    if args.no_eval:
      return 0
    runs = {'float32': api.load_run(args.workdir, step=args.step, data_dir=args.data_dir),
            'int8': api.load_run(args.out, data_dir=args.data_dir)}
  except api.RunError as e:
    print(f'mmfusion.quantize: {e}', file=sys.stderr)
    return 1
  results = {name: run.evaluate() for name, run in runs.items()}
  keys = sorted(k for k in results['float32'] if not k.endswith('/seconds'))
  print(f"{'metric':<32} {'float32':>10} {'int8':>10} {'int8 - float32':>15}")
  for k in keys:
    a, b = results['float32'][k], results['int8'].get(k, float('nan'))
    print(f'{k:<32} {a:>10.4f} {b:>10.4f} {b - a:>+15.4f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
