"""Training objectives, looked up by name from `config.objectives`.

Each objective is `fn(outputs, batch, **kwargs) -> (scalar loss, metrics dict)`; the trainer
sums `weight * loss`, the weight optionally ramped up linearly over the first `ramp_steps`
steps. What an objective reads is derived from its arguments (`needs`), and checked against the
model's outputs before any compute. New objectives register (objectives/registry.py) and need
no change to the trainer.

  contrastive.py  softmax (CLIP) and sigmoid (SigLIP) losses over pairs of modalities
  ring.py         their sharded forms over the global batch (all-gather; chunked ppermute ring)
  fused.py        classification, itm, mlm, captioning, vqa on the heads' outputs
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mmfusion.objectives import contrastive  # noqa: F401  (registers the contrastive losses)
from mmfusion.objectives import fused  # noqa: F401  (registers the heads' losses)
from mmfusion.objectives.registry import REGISTRY, Metrics, Objective, register  # noqa: F401
from mmfusion.objectives.ring import ring_chunk  # noqa: F401

# Keys of an objective's config that are the trainer's, not the objective function's.
SCHEDULE_KEYS = ('weight', 'ramp_steps')


def _split_cfg(cfg: Mapping[str, Any]) -> tuple[float, int, dict[str, Any]]:
  """(weight, ramp_steps, the objective's kwargs) of one objective's config."""
  cfg = dict(cfg)
  weight = cfg.pop('weight', 1.0)
  ramp_steps = cfg.pop('ramp_steps', 0)
  return weight, ramp_steps, cfg


def effective_weight(weight: float, ramp_steps: int, step=None) -> jax.Array:
  """weight * min(1, step / ramp_steps): a linear ramp from 0 at step 0 to `weight` at
  `ramp_steps`, constant after; ramp_steps 0 or step None (outside training) -> `weight`.

  `step` may be a traced integer (the train state's step), so this is jnp arithmetic.
  """
  if step is None or not ramp_steps:
    return jnp.asarray(weight, jnp.float32)
  ramp = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
  return weight * ramp


def total_loss(objectives_config: Mapping[str, Mapping[str, Any]], outputs, batch, step=None,
               ) -> tuple[jax.Array, Metrics]:
  """Weighted sum of the configured objectives; metrics are keyed '<name>/<metric>', with
  '<name>/weight' the weight applied at `step` (see `effective_weight`)."""
  total = jnp.zeros((), jnp.float32)
  metrics: Metrics = {}
  for name, cfg in objectives_config.items():
    weight, ramp_steps, kwargs = _split_cfg(cfg)
    loss, ms = REGISTRY[name].fn(outputs, batch, **kwargs)
    weight = effective_weight(weight, ramp_steps, step)
    total = total + weight * loss
    metrics.update({f'{name}/{k}': v for k, v in ms.items()})
    metrics[f'{name}/weight'] = weight
  metrics['loss'] = total
  return total, metrics


def needs(name: str, cfg: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(model output paths, batch keys) that `config.objectives.<name>` reads."""
  _, _, kwargs = _split_cfg(cfg)
  try:
    return REGISTRY[name].needs(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.objectives.{name}: {e}') from e


def check_config(objectives_config: Mapping[str, Mapping[str, Any]]) -> None:
  """Names, weights, ramps and arguments of `config.objectives`, checked without a model."""
  if not objectives_config:
    raise ValueError('config.objectives is empty: name at least one objective '
                     f'(known: {sorted(REGISTRY)}).')
  for name, cfg in objectives_config.items():
    if name not in REGISTRY:
      raise ValueError(f'config.objectives.{name}: unknown objective; known: {sorted(REGISTRY)}.')
    weight, ramp_steps, kwargs = _split_cfg(cfg)
    # bool is a number to Python, never a weight or a step count in a config.
    if (not isinstance(weight, numbers.Real) or isinstance(weight, bool)
        or not math.isfinite(weight) or weight < 0):
      raise ValueError(f'config.objectives.{name}.weight = {weight!r}: must be a number >= 0.')
    if (not isinstance(ramp_steps, numbers.Integral) or isinstance(ramp_steps, bool)
        or ramp_steps < 0):
      raise ValueError(f'config.objectives.{name}.ramp_steps = {ramp_steps!r}: must be an '
                       'integer >= 0 (steps of linear ramp-up of the weight; 0: constant).')
    signature = inspect.signature(REGISTRY[name].fn)
    try:
      signature.bind(None, None, **kwargs)
    except TypeError as e:
      takes = [p for p in list(signature.parameters)[2:]]
      raise ValueError(f'config.objectives.{name}: {e}; it takes {takes} besides '
                       f'{list(SCHEDULE_KEYS)}.') from None
    needs(name, cfg)


def _has_path(tree: Mapping[str, Any], path: str) -> bool:
  node = tree
  for part in path.split('/'):
    if not isinstance(node, Mapping) or part not in node:
      return False
    node = node[part]
  return True


def check_outputs(objectives_config, abstract_outputs, batch_keys) -> None:
  """Fails before any compute if an objective lacks what it needs from the model or batch."""
  for name, cfg in objectives_config.items():
    outputs, batch = needs(name, cfg)
    missing = [p for p in outputs if not _has_path(abstract_outputs, p)]
    if missing:
      obj = REGISTRY[name]
      where = (f'its head is set by {obj.head}' if obj.head else 'check config.model.towers')
      raise ValueError(f'config.objectives.{name} needs model outputs {missing}, which the '
                       f'model does not produce: {where}; the batch must also hold the inputs '
                       f'(config.data.inputs).')
    missing = [k for k in batch if k not in batch_keys]
    if missing:
      raise ValueError(f'config.objectives.{name} needs batch keys {missing}; the batch has '
                       f'{sorted(batch_keys)}.')
