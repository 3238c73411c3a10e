"""LoRA adapters merged into the kernels, for export: a run fine-tuned with
`config.model.peft.type='lora'` becomes a plain model of the base architecture, whose outputs
equal the adapted model's.

  python -m mmfusion.peft --workdir workdirs/lora_run --out workdirs/lora_merged [--step N]

writes a workdir (its config with peft off, one checkpoint of the merged parameters) that
`mmfusion.load_run`, `init_from` and evaluation read like any other. The adapters themselves
live in models/layers.py (HeadsDense), the freezing in optim.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mmfusion.models import layers


def merge(params: Mapping[str, Any], scale: float) -> dict[str, Any]:
  """Every layer with adapters (a node holding kernel, lora_a, lora_b) gets the kernel
  W + scale * A B and loses its adapters; everything else is unchanged. Scanned layers (a
  leading layer axis on all three) merge layer by layer."""
  out = {}
  for name, node in params.items():
    if not isinstance(node, Mapping):
      out[name] = node
    elif 'lora_a' in node and 'lora_b' in node:
      kernel, a, b = (np.asarray(node[k]) for k in ('kernel', 'lora_a', 'lora_b'))
      merge_one = lambda w, x, y: layers.lora_merged(w, x, y, scale)
      scanned = a.ndim + b.ndim - 2 == kernel.ndim + 1
      merged = (jax.vmap(merge_one) if scanned else merge_one)(kernel, a, b)
      out[name] = {k: v for k, v in node.items() if k not in layers.LORA_PARAMS}
      out[name]['kernel'] = np.asarray(merged)
    else:
      out[name] = merge(node, scale)
  return out


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Merges the adapters of `workdir`'s checkpoint (newest, or `step`) into a new workdir
  `out`; returns its step directory."""
  from mmfusion import api
  from mmfusion import checkpoint as ckpt_lib
  from mmfusion.models import model as model_lib
  step_dir = api.step_dir(workdir, step)
  config = api.load_config(step_dir)
  lora = model_lib.lora_options(config.model)
  if lora is None:
    raise api.RunError(f'{workdir}: config.model.peft.type is empty: no adapters to merge.')
  params = merge(ckpt_lib.load_params(step_dir), lora.scale)
  config.unlock()
  config.model.peft.type = ''
  config.init_from.path = ''
  with open(os.path.join(step_dir, 'meta', 'metadata')) as f:
    meta = json.load(f)
  meta['merged_from'] = os.path.abspath(step_dir)
  try:
    return ckpt_lib.write_workdir(out, int(os.path.basename(step_dir)), {'params': params},
                                  config, meta)
  except ckpt_lib.CheckpointError as e:
    raise api.RunError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m mmfusion.peft', description=__doc__.split(
      '\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a run trained with LoRA')
  parser.add_argument('--out', required=True, help='where the merged workdir goes')
  parser.add_argument('--step', type=int, default=None, help='default: the newest checkpoint')
  args = parser.parse_args(argv)
  from mmfusion import api
  try:
    written = export(args.workdir, args.out, args.step)
  except api.RunError as e:
    print(f'mmfusion.peft: {e}', file=sys.stderr)
    return 1
  print(f'merged adapters of {args.workdir} into {written}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
