"""Training objectives, looked up by name from `config.objectives`.

Each objective is `fn(outputs, batch, **kwargs) -> (scalar loss, metrics dict)`; the trainer
sums `weight * loss`, the weight optionally ramped up linearly over the first `ramp_steps`
steps. New objectives register here and need no change to the trainer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from mmfusion import sharding

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  fn: Callable[..., tuple[jax.Array, Metrics]]
  needs_outputs: tuple[str, ...]       # paths into the model output, e.g. 'embeddings/image'
  needs_batch: tuple[str, ...]         # batch keys
  head: str = ''                       # the config setting that makes the model produce them


REGISTRY: dict[str, Objective] = {}


def register(name: str, *, needs_outputs=(), needs_batch=(), head=''):
  """`head`: the config setting that gives the model what this objective reads, named in
  the error when it is missing."""
  def wrap(fn):
    REGISTRY[name] = Objective(fn, tuple(needs_outputs), tuple(needs_batch), head)
    return fn
  return wrap


def _pair(outputs, modalities) -> tuple[jax.Array, jax.Array]:
  a, b = modalities
  return outputs['embeddings'][a], outputs['embeddings'][b]


@register('softmax_contrastive',
          needs_outputs=('embeddings/image', 'embeddings/text', 'logit_scale'))
def softmax_contrastive(outputs, batch, modalities=('image', 'text')):
  """CLIP: symmetric cross-entropy over the similarity matrix of the global batch.

  With the batch sharded (`sharding.current_batch_axes()` non-empty), each of the n shards
  gathers the other modality and scores its own b = B / n rows in both directions: b x B
  logits per device, never B x B, and the same loss as on one device.
  """
  del batch
  za_bd, zb_bd = _pair(outputs, modalities)
  scale = outputs['logit_scale']
  axes = sharding.current_batch_axes()
  if axes:
    sharded = jax.shard_map(functools.partial(_softmax_shard, axes=axes),
                            in_specs=(P(axes), P(axes), P()), out_specs=P())
    loss, accuracy = sharded(za_bd, zb_bd, scale)
  else:
    loss, accuracy = _softmax_dense(za_bd, zb_bd, scale)
  return loss, {
      'loss': loss,
      'batch_accuracy': accuracy,
      'logit_scale': scale,
  }


def _softmax_dense(za_bd, zb_bd, scale):
  logits_ab = scale * za_bd @ zb_bd.T                              # [B, B]
  labels = jnp.arange(logits_ab.shape[0])
  loss_ab = optax.softmax_cross_entropy_with_integer_labels(logits_ab, labels).mean()
  loss_ba = optax.softmax_cross_entropy_with_integer_labels(logits_ab.T, labels).mean()
  accuracy = (jnp.argmax(logits_ab, axis=1) == labels).mean()
  return 0.5 * (loss_ab + loss_ba), accuracy


def _softmax_shard(za_bd, zb_bd, scale, *, axes):
  """One shard's rows of the global logits, both directions (inside shard_map over `axes`).

  all_gather's transpose is a reduce-scatter, so every shard's gradient also reaches the
  embeddings that other shards scored it against.
  """
  b = za_bd.shape[0]
  za_nd = jax.lax.all_gather(za_bd, axes, tiled=True)              # [B, D], B = n * b
  zb_nd = jax.lax.all_gather(zb_bd, axes, tiled=True)
  global_b = za_nd.shape[0]
  labels_b = jax.lax.axis_index(axes) * b + jnp.arange(b)          # global index of each row
  logits_ab = scale * za_bd @ zb_nd.T                              # [b, B] my a vs every b
  logits_ba = scale * zb_bd @ za_nd.T                              # [b, B] my b vs every a
  xent = optax.softmax_cross_entropy_with_integer_labels
  loss = xent(logits_ab, labels_b).sum() + xent(logits_ba, labels_b).sum()
  correct = jnp.sum(jnp.argmax(logits_ab, axis=1) == labels_b).astype(jnp.float32)
  loss, correct = jax.lax.psum((loss, correct), axes)
  return loss / (2 * global_b), correct / global_b


@register('sigmoid_contrastive',
          needs_outputs=('embeddings/image', 'embeddings/text', 'logit_scale', 'logit_bias'))
def sigmoid_contrastive(outputs, batch, modalities=('image', 'text'), chunk_size=1024,
                        impl='ring'):
  """SigLIP: every pair is an independent binary problem; positives on the diagonal.

  Normalised by the global batch size B (not B^2), as in the SigLIP paper.

  impl='ring' (default): each of the n batch shards keeps its b = B / n rows of modality a and
  passes its block of modality b around the ring of shards (n - 1 hops of `ppermute`),
  scoring each visiting block `chunk_size` columns at a time (the largest divisor of b that
  is <= chunk_size). The backward pass sends the blocks around again with their gradients
  and recomputes each chunk's logits, so a device holds O(b * D + b * chunk) floats however
  large B grows. On one device (or outside a mesh) it is a ring of one: chunks only.
  impl='dense': the B x B logits in one piece, the reference (plain jit; XLA partitions it).
  """
  del batch
  if impl not in ('ring', 'dense'):
    raise ValueError(f"sigmoid_contrastive: impl={impl!r}; use 'ring' or 'dense'.")
  if chunk_size < 1:
    raise ValueError(f'sigmoid_contrastive: chunk_size={chunk_size}; must be >= 1.')
  za_bd, zb_bd = _pair(outputs, modalities)
  scale, bias = outputs['logit_scale'], outputs['logit_bias']
  if impl == 'dense':
    loss, accuracy = _sigmoid_dense(za_bd, zb_bd, scale, bias)
  else:
    axes = sharding.current_batch_axes()
    ring = functools.partial(_sigmoid_ring, axes=axes, chunk_size=chunk_size)
    if axes:
      ring = jax.shard_map(ring, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
    loss, accuracy = ring(za_bd, zb_bd, scale, bias)
  return loss, {
      'loss': loss,
      'batch_accuracy': accuracy,
      'logit_scale': scale,
      'logit_bias': bias,
  }


def _sigmoid_dense(za_bd, zb_bd, scale, bias):
  logits_ab = scale * za_bd @ zb_bd.T + bias                       # [B, B]
  n = logits_ab.shape[0]
  signs = 2.0 * jnp.eye(n) - 1.0                                   # +1 diagonal, -1 elsewhere
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits_ab)) / n
  return loss, (jnp.argmax(logits_ab, axis=1) == jnp.arange(n)).mean()


def _sigmoid_ring(za_bd, zb_bd, scale, bias, *, axes, chunk_size):
  """Loss and batch accuracy over the global batch; inside shard_map over `axes` or, with
  axes=(), on the whole batch."""
  b = za_bd.shape[0]
  global_b = b * _ring_size(axes)
  chunk = ring_chunk(b, chunk_size)
  # Replicated scalars meet per-shard data inside the custom VJP: made per-shard here, their
  # transpose sums the shards' gradients.
  scale, bias = _varying((scale, bias), axes)
  loss, correct = _ring_sums(za_bd, zb_bd, scale, bias, axes, chunk)
  if axes:
    loss, correct = jax.lax.psum((loss, correct), axes)
  return loss / global_b, correct / global_b


def ring_chunk(local_batch: int, chunk_size: int) -> int:
  """Columns the ring scores at once: the largest divisor of the local batch <= chunk_size
  (equal chunks keep the scan's shapes static)."""
  return max(c for c in range(1, min(chunk_size, local_batch) + 1) if local_batch % c == 0)


def _ring_size(axes) -> int:
  return jax.lax.axis_size(axes) if axes else 1


def _varying(tree, axes):
  """Marks replicated values as differing per shard (needed where they meet per-shard values
  in a loop carry or a custom VJP); the identity without axes."""
  return jax.lax.pcast(tree, axes, to='varying') if axes else tree


def _shift(tree, axes):
  """Passes `tree` one step around the ring of batch shards: shard i sends to shard i + 1."""
  if not axes:
    return tree
  n = _ring_size(axes)
  return jax.lax.ppermute(tree, axes, [(i, (i + 1) % n) for i in range(n)])


def _positives(b, chunk, start, diagonal):
  """[b, chunk] mask of the positive pairs in the chunk of columns from `start`: row i's own
  column, present only in the shard's own block (`diagonal`)."""
  if not diagonal:
    return False
  return jnp.arange(b)[:, None] == start + jnp.arange(chunk)[None, :]


def _chunk_logits(za_bd, zb_cd, scale, bias):
  return scale * za_bd @ zb_cd.T + bias                            # [b, chunk]


def _pairs_loss(logits_bc, positive_bc):
  """-sum of log sigmoid(logit) over the positive pairs and log sigmoid(-logit) over the rest."""
  return -jnp.sum(jax.nn.log_sigmoid(jnp.where(positive_bc, logits_bc, -logits_bc)))


def _chunked(zb_bd, chunk):
  """[b, D] -> ([b / chunk, chunk, D], the first column of each chunk)."""
  zb_kcd = zb_bd.reshape(-1, chunk, zb_bd.shape[-1])
  return zb_kcd, jnp.arange(zb_kcd.shape[0]) * chunk


def _score_block(za_bd, zb_bd, scale, bias, chunk, axes, diagonal):
  """Loss sum over one block of columns, each row's positive logit and the max over its
  negatives; a scan over chunks of columns, so only [b, chunk] logits are ever live."""
  b = za_bd.shape[0]

  def body(carry, xs):
    loss, positive_b, negative_max_b = carry
    zb_cd, start = xs
    positive_bc = _positives(b, chunk, start, diagonal)
    logits_bc = _chunk_logits(za_bd, zb_cd, scale, bias)
    loss = loss + _pairs_loss(logits_bc, positive_bc)
    positive_b = positive_b + jnp.sum(jnp.where(positive_bc, logits_bc, 0.0), axis=1)
    negative_max_b = jnp.maximum(
        negative_max_b, jnp.max(jnp.where(positive_bc, -jnp.inf, logits_bc), axis=1))
    return (loss, positive_b, negative_max_b), None

  # Sums at least in float32, whatever the embeddings' dtype.
  dtype = jnp.promote_types(jnp.result_type(za_bd, zb_bd, scale, bias), jnp.float32)
  init = _varying((jnp.zeros((), dtype), jnp.zeros((b,), dtype), jnp.full((b,), -jnp.inf, dtype)),
                  axes)
  return jax.lax.scan(body, init, _chunked(zb_bd, chunk))[0]


def _block_grads(za_bd, zb_bd, scale, bias, g, chunk, diagonal):
  """Gradients of g * (loss sum over one block) w.r.t. za, zb, scale, bias, chunk by chunk:
  each chunk's logits are recomputed and dropped, never stored."""
  b, d = za_bd.shape

  def body(carry, xs):
    zb_cd, start = xs
    positive_bc = _positives(b, chunk, start, diagonal)
    _, vjp = jax.vjp(lambda *args: _pairs_loss(_chunk_logits(*args), positive_bc),
                     za_bd, zb_cd, scale, bias)
    dza_bd, dzb_cd, dscale, dbias = vjp(g)
    carry = jax.tree.map(jnp.add, carry, (dza_bd, dscale, dbias))
    return carry, dzb_cd

  init = (jnp.zeros_like(za_bd), jnp.zeros_like(scale), jnp.zeros_like(bias))  # per shard too
  (dza_bd, dscale, dbias), dzb_kcd = jax.lax.scan(body, init, _chunked(zb_bd, chunk))
  return dza_bd, dzb_kcd.reshape(b, d), dscale, dbias


# The ring as a custom VJP: differentiating the forward ring would keep every visiting block
# (all B rows of modality b) for the backward pass; this one keeps only the shard's own blocks.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_sums(za_bd, zb_bd, scale, bias, axes, chunk):
  """(this shard's loss sum, its number of rows whose positive beats every negative)."""
  return _ring_sums_fwd(za_bd, zb_bd, scale, bias, axes, chunk)[0]


def _ring_sums_fwd(za_bd, zb_bd, scale, bias, axes, chunk):
  # Hop 0: the shard's own block, which holds its positives. Block k (from shard i - k) next.
  loss, positive_b, negative_max_b = _score_block(za_bd, zb_bd, scale, bias, chunk, axes,
                                                  diagonal=True)

  def hop(_, carry):
    zb_visiting, loss, negative_max_b = carry
    zb_visiting = _shift(zb_visiting, axes)
    block_loss, _, block_max_b = _score_block(za_bd, zb_visiting, scale, bias, chunk, axes,
                                              diagonal=False)
    return zb_visiting, loss + block_loss, jnp.maximum(negative_max_b, block_max_b)

  _, loss, negative_max_b = jax.lax.fori_loop(1, _ring_size(axes), hop,
                                              (zb_bd, loss, negative_max_b))
  # A tie with a negative counts as a miss (argmax would pick the lower column).
  correct = jnp.sum(positive_b > negative_max_b).astype(loss.dtype)
  return (loss, correct), (za_bd, zb_bd, scale, bias)


def _ring_sums_bwd(axes, chunk, residuals, cotangents):
  za_bd, zb_bd, scale, bias = residuals
  g, _ = cotangents                       # the count of correct rows has no gradient
  dza_bd, dzb_bd, dscale, dbias = _block_grads(za_bd, zb_bd, scale, bias, g, chunk,
                                               diagonal=True)

  # Each visiting block travels with the gradient accumulated for it so far.
  def hop(_, carry):
    zb_visiting, dzb_visiting, dza_bd, dscale, dbias = carry
    zb_visiting, dzb_visiting = _shift((zb_visiting, dzb_visiting), axes)
    dza_hop, dzb_hop, dscale_hop, dbias_hop = _block_grads(za_bd, zb_visiting, scale, bias, g,
                                                           chunk, diagonal=False)
    return (zb_visiting, dzb_visiting + dzb_hop, dza_bd + dza_hop, dscale + dscale_hop,
            dbias + dbias_hop)

  _, dzb_bd, dza_bd, dscale, dbias = jax.lax.fori_loop(
      1, _ring_size(axes), hop, (zb_bd, dzb_bd, dza_bd, dscale, dbias))
  # After n - 1 hops each gradient sits one shard short of its block's owner.
  return dza_bd, _shift(dzb_bd, axes), dscale, dbias


_ring_sums.defvjp(_ring_sums_fwd, _ring_sums_bwd)


@register('classification', needs_outputs=('logits',), needs_batch=('label',),
          head='config.model.head.num_classes')
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


@register('itm', needs_outputs=('itm/logits', 'itm/labels'),
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


@register('mlm', needs_outputs=('mlm/logits', 'mlm/targets', 'mlm/weights'),
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


@register('captioning', needs_outputs=('caption/logits', 'caption/targets', 'caption/weights'),
          head='config.model.decoder.depth')
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


@register('vqa', needs_outputs=('vqa/logits',), needs_batch=('answer',),
          head='config.model.heads.vqa_answers (with config.model.fusion.strategy)')
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
    weight, ramp_steps, _ = _split_cfg(cfg)
    # bool is a number to Python, never a weight or a step count in a config.
    if (not isinstance(weight, numbers.Real) or isinstance(weight, bool)
        or not math.isfinite(weight) or weight < 0):
      raise ValueError(f'config.objectives.{name}.weight = {weight!r}: must be a number >= 0.')
    if (not isinstance(ramp_steps, numbers.Integral) or isinstance(ramp_steps, bool)
        or ramp_steps < 0):
      raise ValueError(f'config.objectives.{name}.ramp_steps = {ramp_steps!r}: must be an '
                       'integer >= 0 (steps of linear ramp-up of the weight; 0: constant).')
    obj = REGISTRY[name]
    missing = [p for p in obj.needs_outputs if not _has_path(abstract_outputs, p)]
    if missing:
      where = (f'its head is set by {obj.head}' if obj.head else 'check config.model')
      raise ValueError(f'config.objectives.{name} needs model outputs {missing}, which the '
                       f'model does not produce: {where}; the batch must also hold the inputs '
                       f'(config.data.inputs).')
    missing = [k for k in obj.needs_batch if k not in batch_keys]
    if missing:
      raise ValueError(f'config.objectives.{name} needs batch keys {missing}; the batch has '
                       f'{sorted(batch_keys)}.')
