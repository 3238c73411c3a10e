"""Sharded contrastive losses over the global batch, for when the batch is split over devices.

softmax: each of the n batch shards all-gathers both modalities' embeddings and scores its own
b = B / n rows in both directions (b x B logits per device, never B x B).
sigmoid: a chunked ring; each shard keeps its b rows of modality a and passes its block of
modality b around the ring of shards (n - 1 hops of `ppermute`), scoring `chunk` columns at a
time, with a custom VJP that sends the blocks round again for the backward pass, so a device
holds O(b * D + b * chunk) floats however large B grows. Outside a mesh it is a ring of one.
Both give the same loss and gradients as the dense single-device versions (objectives/contrastive.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


def softmax_global(za_bd, zb_bd, scale, axes: tuple[str, ...]):
  """(loss, batch accuracy) of CLIP's loss over the global batch, the batch sharded over
  `axes` (non-empty): runs `_softmax_shard` under shard_map."""
  sharded = jax.shard_map(functools.partial(_softmax_shard, axes=axes),
                          in_specs=(P(axes), P(axes), P()), out_specs=P())
  return sharded(za_bd, zb_bd, scale)


def sigmoid_ring(za_bd, zb_bd, scale, bias, axes: tuple[str, ...], chunk_size: int):
  """(loss, batch accuracy) of SigLIP's loss over the global batch as a chunked ring over the
  batch shards of `axes` (() outside a mesh: chunks only)."""
  ring = functools.partial(_sigmoid_ring, axes=axes, chunk_size=chunk_size)
  if axes:
    ring = jax.shard_map(ring, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  return ring(za_bd, zb_bd, scale, bias)


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


