"""Checkpoints: orbax CheckpointManager for resume, and strict partial loading for init_from.

A checkpoint step holds two items: `state` (params, optimizer state, step, rng) and `meta`
(JSON: step, data position, config). Loading refuses silent mismatches and prints a diff.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmfusion import errors
from mmfusion import quantize

CHECKPOINT_SUBDIR = 'checkpoints'
DAMAGED_SUBDIR = 'damaged_checkpoints'     # where resume moves checkpoints that do not restore
# Heads' params before heads were named as in config.model.heads (models/heads.py): old
# top-level name -> (new name, the sub-module the old params now sit in).
LEGACY_HEADS = {'head': ('classification', 'dense'), 'itm_head': ('itm', 'classifier'),
                'vqa_head': ('vqa', 'classifier'), 'mlm_head': ('mlm', 'vocab'),
                'caption_decoder': ('caption', 'decoder')}


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable, or does not match the model."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint whose files are damaged or incomplete. `details`: what the storage library
  printed while failing (kept for the error log)."""

  def __init__(self, message: str, details: str = '', cause: str = ''):
    super().__init__(message)
    self.details = details
    self.cause = cause or message


@contextlib.contextmanager
def _reading(where: str, what: str) -> Iterator[None]:
  """Orbax reading a step: its failures (many exception types; tensorstore prints tracebacks
  from its own threads for a while after) become one UnreadableCheckpoint carrying that output."""
  with errors.captured_output(grace_s=0.5) as printed:
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:   # noqa: BLE001 (orbax raises many types for damaged steps)
      cause = _first_line(e)
      raise UnreadableCheckpoint(f'checkpoint {where} {what}: {cause}',
                                 details=printed.getvalue(), cause=cause) from e


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else type(error).__name__
  text = text.split(' [tensorstore_spec=')[0]     # a page of JSON after the cause
  return text if len(text) <= 300 else text[:300] + ' ...'


# ----------------------------------------------------------------------------- trees

def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def subtree(tree: Mapping[str, Any], path: str, what: str) -> Mapping[str, Any]:
  node = tree
  for part in filter(None, path.split('/')):
    if not isinstance(node, Mapping) or part not in node:
      have = sorted(node) if isinstance(node, Mapping) else []
      raise CheckpointError(f'{what}: no sub-tree {path!r} (at {part!r}; available: {have}).')
    node = node[part]
  return node


def shape_diff(expected: Mapping[str, Any], found: Mapping[str, Any],
               expected_name: str = 'model', found_name: str = 'checkpoint') -> list[str]:
  """Readable lines for every name or shape mismatch between two flat {path: array}."""
  lines = []
  for path in sorted(set(expected) - set(found)):
    lines.append(f'  - {path} {tuple(np.shape(expected[path]))}: in the {expected_name}, '
                 f'missing from the {found_name}')
  for path in sorted(set(found) - set(expected)):
    lines.append(f'  + {path} {tuple(np.shape(found[path]))}: in the {found_name}, '
                 f'unknown to the {expected_name}')
  for path in sorted(set(expected) & set(found)):
    e, f = tuple(np.shape(expected[path])), tuple(np.shape(found[path]))
    if e != f:
      lines.append(f'  ~ {path}: {expected_name} {e} vs {found_name} {f}')
  return lines


# ----------------------------------------------------------------------------- resume

class Checkpointer:
  """Saves and restores the whole train state under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Named handlers let a fresh process read a step's metadata before restoring it.
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON item of `step` (its step, data position and config), without the state."""
    with _reading(f'{self.directory}/{step}', 'is unreadable'):
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(meta['meta'])

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into `abstract_state`'s structure and shardings, after a strict check."""
    with _reading(f'{self.directory}/{step}', 'is unreadable'):
      saved = self._manager.item_metadata(step)['state']
    if saved is None:
      raise UnreadableCheckpoint(f'checkpoint {self.directory}/{step} has no readable state item.')
    saved_flat = _flat_metadata(saved)
    wanted_flat = {_path_str(k): v for k, v in
                   jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    diff = shape_diff(wanted_flat, saved_flat, 'current config', 'checkpoint')
    if diff:
      legacy = sorted({p.split('/')[1] for p in saved_flat if p.startswith('params/')}
                      & set(LEGACY_HEADS))
      hint = (f' It holds heads under their names from before mmfusion named them as in '
              f'config.model.heads ({legacy}): it cannot be resumed, but a new workdir can start '
              'from it with config.init_from.path, which renames them.' if legacy else '')
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} does not match the current config; resume with '
          f'the config it was written with, or use a new workdir.{hint} Differences:\n'
          + '\n'.join(diff[:40]) + (f'\n  ... and {len(diff) - 40} more' if len(diff) > 40 else ''))
    with _reading(f'{self.directory}/{step}', 'could not be restored'):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def restore_newest(self, abstract_state: Any, log: Callable[[str], None]
                     ) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that restores (None when there is none). Damaged newer ones are
    then moved to `<workdir>/damaged_checkpoints/` (kept, not deleted), each named with its
    cause in `log`. When none restores, all stay where they are and the error names each. A
    checkpoint that reads but does not fit the config stops the search: that is the config's
    doing, not damage."""
    damaged: list[tuple[int, UnreadableCheckpoint]] = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, abstract_state)
      except UnreadableCheckpoint as e:
        damaged.append((step, e))
        continue
      for bad_step, error in damaged:
        self.set_aside(bad_step)
        log(f'skipped damaged checkpoint {self.directory}/{bad_step} ({error.cause}); moved it '
            f'to {self.damaged_dir}/{bad_step}.')
      return restored
    if damaged:
      raise UnreadableCheckpoint(
          f'no checkpoint under {self.directory} restores: '
          + '; '.join(f'step {step}: {error.cause}' for step, error in damaged)
          + '. Move them away to start again in this workdir, or start a new one from a '
          'step\'s params with config.init_from.path.',
          details='\n'.join(error.details for _, error in damaged))
    return None

  @property
  def damaged_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), DAMAGED_SUBDIR)

  def set_aside(self, step: int) -> None:
    """Moves step's directory out of the manager's way (a new save may reuse the number)."""
    if jax.process_index() == 0:
      os.makedirs(self.damaged_dir, exist_ok=True)
      target = os.path.join(self.damaged_dir, str(step))
      if os.path.exists(target):
        target += time.strftime('-%Y%m%d-%H%M%S')
      os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def write_workdir(out: str, step: int, state: Mapping[str, Any], config: Any,
                  meta: Mapping[str, Any]) -> str:
  """A new workdir `out` holding one checkpoint (`state`: 'params' and any other items; `meta`
  with `config` added) and its config.json, as the trainer writes them: what exports and
  imports produce for `load_run` and `init_from`. Refuses a directory that already holds
  checkpoints. Returns the step directory."""
  import json     # noqa: PLC0415
  if os.path.exists(os.path.join(out, CHECKPOINT_SUBDIR)):
    raise CheckpointError(f'{out} already holds checkpoints; give an empty directory.')
  os.makedirs(out, exist_ok=True)
  meta = json.loads(json.dumps({**meta, 'config': config.to_dict()}, default=str))
  checkpointer = Checkpointer(out, max_to_keep=1, async_save=False)
  checkpointer.save(step, dict(state), meta)
  checkpointer.wait()
  checkpointer.close()
  with open(os.path.join(out, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return find_step_dir(out)


def _path_str(keypath) -> str:
  """'opt_state/1/0/mu/image/kernel': the same for a live tree and orbax's metadata of it
  (which stores dataclasses and named tuples as dicts)."""
  parts = []
  for k in keypath:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def _flat_metadata(tree_metadata) -> dict[str, np.ndarray]:
  tree = getattr(tree_metadata, 'tree', tree_metadata)
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {_path_str(k): np.zeros(v.shape, np.int8) for k, v in leaves}


# ----------------------------------------------------------------------------- init_from

def find_step_dir(path: str) -> str:
  """A workdir, a checkpoints dir, or one step's dir -> that (or the latest) step's dir."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise CheckpointError(f'config.init_from.path: {path} does not exist.')
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  for root in (os.path.join(path, CHECKPOINT_SUBDIR), path):
    if not os.path.isdir(root):
      continue
    steps = sorted(int(d) for d in os.listdir(root)
                   if d.isdigit() and os.path.isdir(os.path.join(root, d, 'state')))
    if steps:
      return os.path.join(root, str(steps[-1]))
  raise CheckpointError(f'config.init_from.path: no checkpoint under {path} (expected a workdir, '
                        f'its {CHECKPOINT_SUBDIR}/ directory, or a step directory holding state/).')


def load_params(path: str, load: str = '') -> dict[str, Any]:
  """Reads `params[/load]` of a checkpoint to host numpy, without touching optimizer state;
  an int8 checkpoint (mmfusion/quantize.py) comes back dequantised to float32."""
  step_dir = find_step_dir(path)
  state_dir = os.path.join(step_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  with _reading(step_dir, 'is unreadable'):
    tree = checkpointer.metadata(state_dir).item_metadata
    tree = getattr(tree, 'tree', tree)
    quantized = quantize.SCALES in tree     # an int8 checkpoint: read it whole, dequantise
    wanted = {'params': dict(subtree(tree['params'], load, f'checkpoint {step_dir}'))
              if load and not quantized else tree['params']}
    for part in reversed([p for p in load.split('/') if p] if not quantized else []):
      wanted['params'] = {part: wanted['params']}
    if quantized:
      wanted[quantize.SCALES] = tree[quantize.SCALES]
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True))
  params = restored['params']
  if quantized:
    params = quantize.dequantize(params, restored[quantize.SCALES])
  return dict(subtree(params, load, f'checkpoint {step_dir}'))


def upgrade_legacy(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Params of a checkpoint written before heads were named as in config.model.heads, in the
  current layout (e.g. itm_head/head/kernel -> itm/classifier/head/kernel), and the renames
  made as 'old -> new' lines; other params pass unchanged."""
  out, renamed = {}, []
  for key, value in params.items():
    if key in LEGACY_HEADS and isinstance(value, Mapping):
      new, inner = LEGACY_HEADS[key]
      out[new] = {inner: value}
      renamed.append(f'{key} -> {new}/{inner}')
    else:
      out[key] = value
  return out, renamed


def merge_params(init_params: Mapping[str, Any], loaded: Mapping[str, Any], *,
                 into: str = '', skip: tuple[str, ...] = (), source: str = 'checkpoint',
                 keep_init: tuple[str, ...] = ()) -> dict[str, Any]:
  """Puts `loaded` at `into` inside `init_params`; every other leaf keeps its init value.

  Strict: inside the target sub-tree, names and shapes must match exactly, except for
  paths under `skip`, which keep their init values and must not be in `loaded`'s way, and
  leaves named in `keep_init` (e.g. LoRA adapters) that `loaded` lacks, which keep theirs.
  """
  target = subtree(init_params, into, 'model params (config.init_from.into)')
  target_flat = flatten(target) if isinstance(target, Mapping) else {'': target}
  loaded_flat = flatten(loaded) if isinstance(loaded, Mapping) else {'': loaded}

  def skipped(path: str) -> bool:
    full = f'{into}/{path}' if into else path
    return any(full == s or full.startswith(s.rstrip('/') + '/') for s in skip)

  expected = {p: v for p, v in target_flat.items() if not skipped(p)
              and not (p.rsplit('/', 1)[-1] in keep_init and p not in loaded_flat)}
  found = {p: v for p, v in loaded_flat.items() if not skipped(p)}
  diff = shape_diff(expected, found, 'model', source)
  if diff:
    raise CheckpointError(
        f'config.init_from: {source} does not match the model at sub-tree {into or "<root>"!r}. '
        'Use init_from.load / init_from.into to pick matching sub-trees and init_from.skip '
        'for parts to keep at init. Differences:\n' + '\n'.join(diff[:40])
        + (f'\n  ... and {len(diff) - 40} more' if len(diff) > 40 else ''))
  merged_target = dict(target_flat)
  for path, value in found.items():
    merged_target[path] = np.asarray(value).astype(target_flat[path].dtype)
  if not into:
    return unflatten(merged_target)
  merged = flatten(init_params)
  for path, value in merged_target.items():
    merged[f'{into}/{path}' if path else into] = value
  return unflatten(merged)
