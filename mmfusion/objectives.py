"""Training objectives, looked up by name from `config.objectives`.

Each objective is `fn(outputs, batch, **kwargs) -> (scalar loss, metrics dict)`; the trainer
sums `weight * loss`. New objectives register here and need no change to the trainer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  fn: Callable[..., tuple[jax.Array, Metrics]]
  needs_outputs: tuple[str, ...]       # paths into the model output, e.g. 'embeddings/image'
  needs_batch: tuple[str, ...]         # batch keys


REGISTRY: dict[str, Objective] = {}


def register(name: str, *, needs_outputs=(), needs_batch=()):
  def wrap(fn):
    REGISTRY[name] = Objective(fn, tuple(needs_outputs), tuple(needs_batch))
    return fn
  return wrap


def _pair(outputs, modalities) -> tuple[jax.Array, jax.Array]:
  a, b = modalities
  return outputs['embeddings'][a], outputs['embeddings'][b]


@register('softmax_contrastive',
          needs_outputs=('embeddings/image', 'embeddings/text', 'logit_scale'))
def softmax_contrastive(outputs, batch, modalities=('image', 'text')):
  """CLIP: symmetric cross-entropy over the in-batch similarity matrix."""
  del batch
  za_bd, zb_bd = _pair(outputs, modalities)
  logits_ab = outputs['logit_scale'] * za_bd @ zb_bd.T            # [B, B]
  labels = jnp.arange(logits_ab.shape[0])
  loss_ab = optax.softmax_cross_entropy_with_integer_labels(logits_ab, labels).mean()
  loss_ba = optax.softmax_cross_entropy_with_integer_labels(logits_ab.T, labels).mean()
  loss = 0.5 * (loss_ab + loss_ba)
  return loss, {
      'loss': loss,
      'batch_accuracy': (jnp.argmax(logits_ab, axis=1) == labels).mean(),
      'logit_scale': outputs['logit_scale'],
  }


@register('sigmoid_contrastive',
          needs_outputs=('embeddings/image', 'embeddings/text', 'logit_scale', 'logit_bias'))
def sigmoid_contrastive(outputs, batch, modalities=('image', 'text')):
  """SigLIP: every pair is an independent binary problem; positives on the diagonal.

  Normalised by the batch size (not B^2), as in the SigLIP paper.
  """
  del batch
  za_bd, zb_bd = _pair(outputs, modalities)
  logits_ab = outputs['logit_scale'] * za_bd @ zb_bd.T + outputs['logit_bias']
  n = logits_ab.shape[0]
  signs = 2.0 * jnp.eye(n) - 1.0                                   # +1 diagonal, -1 elsewhere
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits_ab)) / n
  return loss, {
      'loss': loss,
      'batch_accuracy': (jnp.argmax(logits_ab, axis=1) == jnp.arange(n)).mean(),
      'logit_scale': outputs['logit_scale'],
      'logit_bias': outputs['logit_bias'],
  }


@register('classification', needs_outputs=('logits',), needs_batch=('label',))
def classification(outputs, batch, label_smoothing=0.0):
  """Softmax cross-entropy of the classification head against `batch['label']`."""
  logits_bc = outputs['logits'].astype(jnp.float32)
  num_classes = logits_bc.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], num_classes), label_smoothing)
  loss = optax.softmax_cross_entropy(logits_bc, targets).mean()
  return loss, {
      'loss': loss,
      'accuracy': (jnp.argmax(logits_bc, axis=-1) == batch['label']).mean(),
  }


def _split_cfg(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
  cfg = dict(cfg)
  weight = cfg.pop('weight', 1.0)
  return weight, cfg


def total_loss(objectives_config: Mapping[str, Mapping[str, Any]], outputs, batch,
               ) -> tuple[jax.Array, Metrics]:
  """Weighted sum of the configured objectives; metrics are keyed '<name>/<metric>'."""
  total = jnp.zeros((), jnp.float32)
  metrics: Metrics = {}
  for name, cfg in objectives_config.items():
    weight, kwargs = _split_cfg(cfg)
    loss, ms = REGISTRY[name].fn(outputs, batch, **kwargs)
    total = total + weight * loss
    metrics.update({f'{name}/{k}': v for k, v in ms.items()})
  metrics['loss'] = total
  return total, metrics


def _has_path(tree: Mapping[str, Any], path: str) -> bool:
  node = tree
  for part in path.split('/'):
    if not isinstance(node, Mapping) or part not in node:
      return False
    node = node[part]
  return True


def check(objectives_config, abstract_outputs, batch_keys) -> None:
  """Fails before any compute if an objective is unknown or lacks what it needs."""
  if not objectives_config:
    raise ValueError('config.objectives is empty: name at least one objective '
                     f'(known: {sorted(REGISTRY)}).')
  for name, cfg in objectives_config.items():
    if name not in REGISTRY:
      raise ValueError(f'config.objectives.{name}: unknown objective; known: {sorted(REGISTRY)}.')
    weight, _ = _split_cfg(cfg)
    if weight < 0:
      raise ValueError(f'config.objectives.{name}.weight = {weight}: must be >= 0.')
    obj = REGISTRY[name]
    missing = [p for p in obj.needs_outputs if not _has_path(abstract_outputs, p)]
    if missing:
      raise ValueError(f'config.objectives.{name} needs model outputs {missing}, which the '
                       'model does not produce (check config.model, e.g. model.head.num_classes '
                       'for classification, and the modalities in the batch).')
    missing = [k for k in obj.needs_batch if k not in batch_keys]
    if missing:
      raise ValueError(f'config.objectives.{name} needs batch keys {missing}; the batch has '
                       f'{sorted(batch_keys)}.')
