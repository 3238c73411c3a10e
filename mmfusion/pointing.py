"""The pointing game (Zhang et al., 2016), measured on the embedded dataset: does a heat-map's
maximum fall on the object that a phrase names?

Trials: every two-object scene of a split of `mmfusion_shapes`, rendered again from its seed (the
renderer knows every object's pixels, data/shapes.py `object_masks`), once per object, with the
phrase 'the <colour> <shape>'. Heat-maps are scored at the resolution they are made at, the
image tower's patch grid: each patch belongs to the object that covers most of it (at least
`min_pixels` of it), or to the background. A trial is a hit when the heat-map's highest patch
belongs to the named object. Beside each method:
  chance   the expected hit rate of a patch drawn uniformly: the named object's share of the
           patches (its area fraction at the heat-map's resolution);
  centre   a centre prior: the patch(es) nearest the image centre (ties averaged).

  python -m mmfusion.pointing --workdir workdirs/shapes_explain
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmfusion.data import shapes


def scenes(split: str = 'test', builder_config: str = 'default',
           limit: int | None = None) -> list[dict[str, Any]]:
  """The two-object scenes of a split, rendered as the dataset renders them (same seed, same
  bytes): image uint8 [S, S, 3], objects (colour, shape, ...), masks [2, S, S]."""
  config = shapes.MmfusionShapes.config_from_spec(builder_config)
  split_id = shapes.SPLITS.index(split)
  out = []
  for index in range(config.num_examples(split)):
    example = shapes.render_example(np.random.default_rng([config.seed, split_id, index]),
                                    config.image_size)
    if example['num_objects'] == 2:
      out.append(example)
      if limit is not None and len(out) >= limit:
        break
  return out


def phrase(obj: dict[str, Any]) -> str:
  return f"the {obj['colour']} {obj['shape']}"


def patch_owners(masks: np.ndarray, grid: tuple[int, int], min_pixels: float = 1.0) -> np.ndarray:
  """masks [M, S, S] pixel coverage -> [rows, cols] int: the object covering most of each patch
  (at least min_pixels of it, in pixels of S), else -1."""
  m, size, _ = masks.shape
  rows, cols = grid
  if size % rows or size % cols:
    raise ValueError(f'a {size} px image does not split into a {rows}x{cols} grid of patches')
  cover = masks.reshape(m, rows, size // rows, cols, size // cols).sum(axis=(2, 4))
  owner = np.argmax(cover, axis=0)
  return np.where(cover.max(axis=0) >= min_pixels, owner, -1)


def centre_patches(grid: tuple[int, int]) -> np.ndarray:
  """bool [rows, cols]: the patches whose centres are nearest the image centre."""
  rows, cols = grid
  r, c = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols,
                     indexing='ij')
  d = np.hypot(r - 0.5, c - 0.5)
  return np.isclose(d, d.min())


def score(heatmaps: np.ndarray, owners: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Hits [T] float (ties at the maximum share the credit): heatmaps [T, rows, cols], owners
  [T, rows, cols], targets [T] (the named object's index)."""
  flat = heatmaps.reshape(len(heatmaps), -1)
  top = np.isclose(flat, flat.max(axis=1, keepdims=True), rtol=0, atol=1e-7)
  hit = owners.reshape(len(owners), -1) == targets[:, None]
  return (top & hit).sum(axis=1) / top.sum(axis=1)


def methods_for(run) -> list[tuple[str, str]]:
  """(method, target) pairs the run supports."""
  pairs = [('rollout', 'similarity'), ('chefer', 'similarity')]
  fusion = dict(run.config.model.fusion)
  if ('itm' in run.config.model.heads and fusion.get('strategy') == 'cross_attention'
          and fusion.get('context') == 'image'):
    pairs += [('rollout', 'itm'), ('chefer', 'itm'), ('gradcam', 'itm')]
  return pairs


def play(run, split: str = 'test', limit: int | None = None,
         methods: Sequence[tuple[str, str]] | None = None, min_pixels: float = 1.0
         ) -> dict[str, Any]:
  """Hit rate of each (method, target) on the split's two-object scenes, with chance and the
  centre prior: {'trials': T, 'grid': [rows, cols], 'rates': {name: rate}}."""
  builder_config = run.config.data.builder_config or 'default'
  found = scenes(split, builder_config, limit)
  if not found:
    raise ValueError(f'split {split!r} of {builder_config!r} has no two-object scene.')
  images = np.stack([s['image'] for s in found for _ in range(2)])
  texts = [phrase(s['objects'][i]) for s in found for i in range(2)]
  targets = np.tile(np.arange(2), len(found))
  results: dict[str, float] = {}
  grid = owners = None
  for method, target in methods or methods_for(run):
    explanation = run.explain(method, target=target, image=images, text=texts)
    if owners is None:
      grid = explanation.heatmap.shape[1:]
      owners = np.repeat(np.stack([patch_owners(s['masks'], grid, min_pixels) for s in found]),
                         2, axis=0)
    results[f'{method} ({target})'] = float(score(explanation.heatmap, owners, targets).mean())
  results['chance (area fraction)'] = float(
      (owners == targets[:, None, None]).mean(axis=(1, 2)).mean())
  centre = np.broadcast_to(centre_patches(grid), owners.shape).astype(np.float32)
  results['centre prior'] = float(score(centre, owners, targets).mean())
  return {'split': split, 'trials': len(texts), 'grid': list(grid), 'rates': results}


def table(result: dict[str, Any]) -> str:
  lines = ['| heat-map | hit rate |', '|---|---|']
  lines += [f'| {name} | {rate:.3f} |' for name, rate in result['rates'].items()]
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a trained run on mmfusion_shapes')
  parser.add_argument('--split', default='test')
  parser.add_argument('--limit', type=int, default=None, help='at most this many scenes')
  args = parser.parse_args(argv)
  from mmfusion import api
  try:
    run = api.load_run(args.workdir)
    if run.config.data.name != shapes.NAME:
      raise ValueError(f'the pointing game needs a run on {shapes.NAME} (its renderer knows the '
                       f'objects); {args.workdir} was trained on {run.config.data.name}.')
    result = play(run, args.split, args.limit)
  except ValueError as e:
    print(f'mmfusion.pointing: {e}', file=sys.stderr)
    return 1
  print(f"{result['trials']} trials ({result['split']} split, two-object scenes x 2 phrases), "
        f"heat-maps on a {result['grid'][0]}x{result['grid'][1]} patch grid:")
  print(table(result))
  with open(os.path.join(args.workdir, 'pointing.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
