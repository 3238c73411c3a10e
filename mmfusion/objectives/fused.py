"""Objectives of the fused heads and the classifier: classification, ITM, MLM, captioning, VQA.
Each reads its head's outputs (models/heads.py), keyed by the head's name.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmfusion.objectives.registry import register


@register('classification', outputs=('classification/logits',), batch=('label',),
          head='config.model.heads.classification')
def classification(outputs, batch, label_smoothing=0.0):
  """Softmax cross-entropy of the classification head against `batch['label']`."""
  logits_bc = outputs['classification']['logits'].astype(jnp.float32)
  num_classes = logits_bc.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], num_classes), label_smoothing)
  loss = optax.softmax_cross_entropy(logits_bc, targets).mean()
  return loss, {
      'loss': loss,
      'accuracy': (jnp.argmax(logits_bc, axis=-1) == batch['label']).mean(),
  }


def _token_losses(logits_blv, targets_bl, weights_bl, label_smoothing=0.0):
  """Per-token cross-entropy, weighted means over the tokens with weight > 0.

  Returns (loss, nll, accuracy, total weight): loss with `label_smoothing` (the smoothed target
  puts label_smoothing / V on every class), nll without it (what perplexity is of); both are
  sum(weights * ce) / max(sum(weights), 1), so a batch with nothing to score gives 0, not NaN.
  """
  logp_blv = jax.nn.log_softmax(logits_blv.astype(jnp.float32), axis=-1)
  nll_bl = -jnp.take_along_axis(logp_blv, targets_bl[..., None].astype(jnp.int32), axis=-1)[..., 0]
  # optax.smooth_labels' target as a sum: (1 - s) * nll + s * mean_v(-log p); no [B, L, V] one-hot.
  ce_bl = (1.0 - label_smoothing) * nll_bl - label_smoothing * jnp.mean(logp_blv, axis=-1)
  weights_bl = weights_bl.astype(jnp.float32)
  total = jnp.sum(weights_bl)
  denominator = jnp.maximum(total, 1.0)
  correct_bl = (jnp.argmax(logp_blv, axis=-1) == targets_bl).astype(jnp.float32)
  return (jnp.sum(weights_bl * ce_bl) / denominator, jnp.sum(weights_bl * nll_bl) / denominator,
          jnp.sum(weights_bl * correct_bl) / denominator, total)


@register('itm', outputs=('itm/logits', 'itm/labels'),
          head='config.model.heads.itm (with config.model.fusion.strategy)')
def itm(outputs, batch):
  """Image-text matching: 2-way softmax cross-entropy (0 no match, 1 match) over the pairs the
  model scored (in training: the positives and ALBEF's in-batch hard negatives).

  positive_accuracy and negative_accuracy are over the pairs of that label (0 with none: e.g.
  negative_accuracy in evaluation, where only positives are scored).
  """
  del batch
  logits_n2 = outputs['itm']['logits'].astype(jnp.float32)
  labels_n = outputs['itm']['labels']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_n2, labels_n).mean()
  correct_n = (jnp.argmax(logits_n2, axis=-1) == labels_n).astype(jnp.float32)
  positive_n = (labels_n == 1).astype(jnp.float32)
  negative_n = 1.0 - positive_n
  return loss, {
      'loss': loss,
      'accuracy': correct_n.mean(),
      'positive_accuracy': jnp.sum(correct_n * positive_n) / jnp.maximum(positive_n.sum(), 1.0),
      'negative_accuracy': jnp.sum(correct_n * negative_n) / jnp.maximum(negative_n.sum(), 1.0),
  }


@register('mlm', outputs=('mlm/logits', 'mlm/targets', 'mlm/weights'),
          head='config.model.heads.mlm (with config.model.fusion.strategy)')
def mlm(outputs, batch):
  """Masked language modelling: cross-entropy at the masked positions (weights 1), averaged
  over them. num_masked is the mean number of scored tokens per text."""
  del batch
  out = outputs['mlm']
  loss, _, accuracy, total = _token_losses(out['logits'], out['targets'], out['weights'])
  return loss, {
      'loss': loss,
      'accuracy': accuracy,
      'num_masked': total / out['weights'].shape[0],
  }


@register('captioning', outputs=('caption/logits', 'caption/targets', 'caption/weights'),
          head='config.model.heads.caption')
def captioning(outputs, batch, label_smoothing=0.0):
  """Teacher-forced next-token cross-entropy of the caption decoder, averaged over the target
  tokens (weights = the text mask, EOS included). perplexity = exp(the unsmoothed NLL)."""
  del batch
  out = outputs['caption']
  loss, nll, accuracy, _ = _token_losses(out['logits'], out['targets'], out['weights'],
                                         label_smoothing)
  return loss, {
      'loss': loss,
      'accuracy': accuracy,
      'perplexity': jnp.exp(nll),
  }


@register('vqa', outputs=('vqa/logits',), batch=('answer',),
          head='config.model.heads.vqa (with config.model.fusion.strategy)')
def vqa(outputs, batch):
  """VQA as classification over the answer vocabulary: cross-entropy against batch['answer'].

  Answers outside the vocabulary are -1 (any negative): those rows are left out of the loss
  and the accuracy, and counted in `unknown_answers` (rows of this batch).
  """
  logits_ba = outputs['vqa']['logits'].astype(jnp.float32)
  answer_b = batch['answer'].astype(jnp.int32)
  known_b = answer_b >= 0
  weights_b = known_b.astype(jnp.float32)
  # -1 would index out of range in the loss: any valid class, then weighted out.
  ce_b = optax.softmax_cross_entropy_with_integer_labels(logits_ba, jnp.where(known_b, answer_b, 0))
  denominator = jnp.maximum(weights_b.sum(), 1.0)
  loss = jnp.sum(weights_b * ce_b) / denominator
  correct_b = (jnp.argmax(logits_ba, axis=-1) == answer_b).astype(jnp.float32)
  return loss, {
      'loss': loss,
      'accuracy': jnp.sum(weights_b * correct_b) / denominator,
      'unknown_answers': jnp.sum(1.0 - weights_b),
  }


