"""Optimizer from config: AdamW, warmup + cosine schedule, decay mask, clipping, frozen towers.

Frozen sub-trees get `set_to_zero` through `optax.multi_transform`, so they keep no Adam
moments and never move.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import optax

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


def make(optim_config: Mapping[str, Any], total_steps: int, freeze: Sequence[str] = (),
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns the transformation and its learning-rate schedule (for logging)."""
  lr_schedule = schedule(optim_config, total_steps)
  tx = _adamw(optim_config, lr_schedule)
  if freeze:
    frozen = set(freeze)
    labels = lambda params: {k: jax.tree.map(lambda _: 'frozen' if k in frozen else 'train', v)
                             for k, v in params.items()}
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, lr_schedule
