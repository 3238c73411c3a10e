"""Resuming a workdir with the config of this run: what may change between the runs of one
workdir, and what may not.

A checkpoint stores the config it was written with. Resuming compares it with this run's:
  * settings that may change (the schedule and its length, evaluation and logging, checkpoint
    cadence, the mesh and speed settings that leave the maths alone) are listed and accepted
    with a warning;
  * every other change (architecture, objectives, data and its order, batch size, tokenizer)
    would silently train a different experiment on top of this one: the run stops with a diff;
  * `total_steps` below the saved step stops with one line.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

# Prefixes of the keys that may change on resume. The mesh and sharding may: a checkpoint is
# restored into any shardings. 'model.attention' / 'remat' / 'remat_save' and 'accum_steps' change
# speed and memory only; 'init_from' is not read when a run resumes.
MAY_CHANGE = ('total_steps', 'optim.', 'evals.', 'log_every', 'checkpoint.', 'init_from.',
              'data.data_dir', 'data.prefetch', 'mesh.', 'mesh_dcn.', 'sharding.', 'accum_steps',
              'model.attention', 'model.remat', 'model.remat_save', 'train.')
_ABSENT = '<absent>'


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      out.update(_flat(value, path + '.'))
    else:
      out[path] = value
  return out


def _plain(config: Any) -> dict[str, Any]:
  """A config (ConfigDict or the JSON a checkpoint holds) as flat JSON values: tuples and lists
  compare equal."""
  tree = config.to_dict() if hasattr(config, 'to_dict') else config
  return _flat(json.loads(json.dumps(tree, default=str)))


def may_change(key: str) -> bool:
  return any(key == p.rstrip('.') or (p.endswith('.') and key.startswith(p)) for p in MAY_CHANGE)


def changes(saved: Any, current: Any, defaults: Any = None) -> tuple[list[str], list[str]]:
  """('key: saved -> now' lines of settings that may not change, and of those that may). A key
  one side lacks counts as its default (`defaults`, e.g. config.base()): a checkpoint written
  before a key existed resumes under that key's default."""
  old, new = _plain(saved), _plain(current)
  base = _plain(defaults) if defaults is not None else {}
  fixed, free = [], []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, base.get(key, _ABSENT)), new.get(key, base.get(key, _ABSENT))
    if a != b:
      (free if may_change(key) else fixed).append(f'{key}: {a!r} -> {b!r}')
  return fixed, free


def check(saved_config: Mapping[str, Any], config: Any, saved_step: int, where: str,
          defaults: Any = None) -> list[str]:
  """Raises ValueError when this run's config may not resume `where` (a checkpoint at
  `saved_step` written with `saved_config`); returns the accepted changes, for a warning."""
  if config.total_steps < saved_step:
    raise ValueError(
        f'config.total_steps = {config.total_steps} is below the step of the checkpoint to '
        f'resume, {where} (step {saved_step}): give total_steps > {saved_step} to train on, or '
        'use a new workdir.')
  fixed, free = changes(saved_config, config, defaults)
  if fixed:
    raise ValueError(
        f'this config differs from the one {where} was written with in settings a resumed run '
        'cannot change; resume with the same settings, or use a new workdir (or start one from '
        'this checkpoint with config.init_from.path). Differences (checkpoint -> now):\n'
        + '\n'.join(f'  ~ {line}' for line in fixed[:40])
        + (f'\n  ... and {len(fixed) - 40} more' if len(fixed) > 40 else ''))
  return free
