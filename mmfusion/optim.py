"""Optimizer from config: AdamW, warmup + cosine schedule, decay mask, clipping, frozen towers,
LoRA (only the adapters and the sub-trees named learn).

Frozen sub-trees get `set_to_zero` through `optax.multi_transform`, so they keep no Adam
moments and never move.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import optax

from mmfusion.models.layers import LORA_PARAMS

# Scalars and vectors (norm scales, biases, temperature, bias of the sigmoid loss) are
# not decayed: decay there only fights the normalisation and the loss's own scale.
def decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def schedule(optim_config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  warmup = min(int(optim_config['warmup_steps']), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_config['lr'], warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim_config['lr'] * optim_config['end_lr_ratio'])


def _adamw(optim_config, lr_schedule) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(optim_config['clip_norm']) if optim_config['clip_norm'] > 0
      else optax.identity(),
      optax.adamw(lr_schedule, b1=optim_config['b1'], b2=optim_config['b2'],
                  eps=optim_config['eps'], weight_decay=optim_config['weight_decay'],
                  mask=decay_mask),
  )


def trainable(params: Any, freeze: Sequence[str] = (),
              adapters_only: Sequence[str] | None = None) -> Any:
  """A bool per leaf: does it learn? Not under a top-level name in `freeze`; with LoRA
  (`adapters_only` not None) only the adapters' leaves and the top-level sub-trees it names."""
  frozen = set(freeze)

  def learns(path, _):
    top, leaf = path[0].key, path[-1].key
    if top in frozen:
      return False
    return adapters_only is None or leaf in LORA_PARAMS or top in set(adapters_only)
  return jax.tree_util.tree_map_with_path(learns, params)


def make(optim_config: Mapping[str, Any], total_steps: int, freeze: Sequence[str] = (),
         adapters_only: Sequence[str] | None = None,
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns the transformation and its learning-rate schedule (for logging). Leaves that do
  not learn (`trainable`) get zero updates and keep no optimizer state."""
  lr_schedule = schedule(optim_config, total_steps)
  tx = _adamw(optim_config, lr_schedule)
  if freeze or adapters_only is not None:
    labels = lambda params: jax.tree.map(lambda t: 'train' if t else 'frozen',
                                         trainable(params, freeze, adapters_only))
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, lr_schedule
