"""Contrastive objectives over pairs of modalities: CLIP's softmax and SigLIP's sigmoid loss.

Each takes `pairs`, a tuple of (a, b) or (a, b, weight) modality pairs (ImageBind-style binding
of several modalities is several pairs), and returns the weighted sum of the pairs' losses.
With the batch sharded over devices both run over the global batch (objectives/ring.py).
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from mmfusion import sharding
from mmfusion.objectives import registry
from mmfusion.objectives import ring


def parse_pairs(pairs) -> list[tuple[str, str, float]]:
  """`pairs` -> [(a, b, weight)]; a malformed entry fails, naming it."""
  if isinstance(pairs, (str, bytes)) or not hasattr(pairs, '__iter__') or not len(pairs):
    raise ValueError(f'pairs = {pairs!r}: expected a non-empty tuple of (a, b) or '
                     '(a, b, weight) modality pairs.')
  parsed = []
  for entry in pairs:
    entry = tuple(entry) if not isinstance(entry, str) else (entry,)
    weight = entry[2] if len(entry) == 3 else 1.0
    if (len(entry) not in (2, 3) or not all(isinstance(m, str) for m in entry[:2])
        or entry[0] == entry[1] or isinstance(weight, bool)
        or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0):
      raise ValueError(f'pairs entry {entry!r}: expected (a, b) or (a, b, weight) with two '
                       'different modality names and a weight >= 0.')
    parsed.append((entry[0], entry[1], float(weight)))
  return parsed


def _needs(scalars: tuple[str, ...]):
  def needs(pairs, impl='ring', chunk_size=1, **_):
    _check_sigmoid_options(impl, chunk_size)
    paths = [f'embeddings/{m}' for a, b, _ in parse_pairs(pairs) for m in (a, b)]
    return tuple(dict.fromkeys(paths)) + scalars, ()
  return needs


def _check_sigmoid_options(impl, chunk_size) -> None:
  if impl not in ('ring', 'dense'):
    raise ValueError(f"impl={impl!r}; use 'ring' or 'dense'.")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f'chunk_size={chunk_size!r}; must be an int >= 1.')


def _over_pairs(pairs, outputs, loss_fn) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_p weight_p * loss_fn(z_a, z_b); batch_accuracy is the pairs' mean, and with several
  pairs each also reports '<a>_<b>/loss' and '<a>_<b>/batch_accuracy'."""
  parsed = parse_pairs(pairs)
  total = jnp.zeros((), jnp.float32)
  metrics, accuracies = {}, []
  for a, b, weight in parsed:
    loss, accuracy = loss_fn(outputs['embeddings'][a], outputs['embeddings'][b])
    total = total + weight * loss
    accuracies.append(accuracy)
    if len(parsed) > 1:
      metrics.update({f'{a}_{b}/loss': loss, f'{a}_{b}/batch_accuracy': accuracy})
  metrics.update(loss=total, batch_accuracy=sum(accuracies) / len(accuracies))
  return total, metrics


@registry.register('softmax_contrastive', needs=_needs(('logit_scale',)))
def softmax_contrastive(outputs, batch, pairs):
  """CLIP: symmetric cross-entropy over the similarity matrix of the global batch, per pair.

  With the batch sharded (`sharding.current_batch_axes()` non-empty), each of the n shards
  gathers the other modality and scores its own b = B / n rows in both directions: b x B
  logits per device, never B x B, and the same loss as on one device.
  """
  del batch
  scale = outputs['logit_scale']
  axes = sharding.current_batch_axes()

  def pair_loss(za_bd, zb_bd):
    return ring.softmax_global(za_bd, zb_bd, scale, axes) if axes else softmax_dense(
        za_bd, zb_bd, scale)
  loss, metrics = _over_pairs(pairs, outputs, pair_loss)
  return loss, {**metrics, 'logit_scale': scale}


@registry.register('sigmoid_contrastive', needs=_needs(('logit_scale', 'logit_bias')))
def sigmoid_contrastive(outputs, batch, pairs, chunk_size=1024, impl='ring'):
  """SigLIP: every pair of examples is an independent binary problem; positives on the diagonal.

  Normalised by the global batch size B (not B^2), as in the SigLIP paper.

  impl='ring' (default): the chunked ring of objectives/ring.py, `chunk_size` columns at a time
  (the largest divisor of the local batch that is <= chunk_size); memory per device linear in
  the global batch. impl='dense': the B x B logits in one piece, the reference (plain jit; XLA
  partitions it).
  """
  del batch
  try:
    _check_sigmoid_options(impl, chunk_size)
  except ValueError as e:
    raise ValueError(f'sigmoid_contrastive: {e}') from None
  scale, bias = outputs['logit_scale'], outputs['logit_bias']
  axes = sharding.current_batch_axes()

  def pair_loss(za_bd, zb_bd):
    if impl == 'dense':
      return sigmoid_dense(za_bd, zb_bd, scale, bias)
    return ring.sigmoid_ring(za_bd, zb_bd, scale, bias, axes, chunk_size)
  loss, metrics = _over_pairs(pairs, outputs, pair_loss)
  return loss, {**metrics, 'logit_scale': scale, 'logit_bias': bias}


def softmax_dense(za_bd, zb_bd, scale):
  """(loss, batch accuracy) with the whole [B, B] logits: the single-device reference."""
  logits_ab = scale * za_bd @ zb_bd.T                              # [B, B]
  labels = jnp.arange(logits_ab.shape[0])
  loss_ab = optax.softmax_cross_entropy_with_integer_labels(logits_ab, labels).mean()
  loss_ba = optax.softmax_cross_entropy_with_integer_labels(logits_ab.T, labels).mean()
  accuracy = (jnp.argmax(logits_ab, axis=1) == labels).mean()
  return 0.5 * (loss_ab + loss_ba), accuracy


def sigmoid_dense(za_bd, zb_bd, scale, bias):
  """(loss, batch accuracy) with the whole [B, B] logits: the single-device reference."""
  logits_ab = scale * za_bd @ zb_bd.T + bias                       # [B, B]
  n = logits_ab.shape[0]
  signs = 2.0 * jnp.eye(n) - 1.0                                   # +1 diagonal, -1 elsewhere
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits_ab)) / n
  return loss, (jnp.argmax(logits_ab, axis=1) == jnp.arange(n)).mean()
