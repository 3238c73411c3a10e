"""Gradient accumulation that is exactly one big batch, for every objective.

Averaging the gradients of k micro-batches equals the big batch's gradient only for a loss that
is a plain mean over examples. A contrastive loss compares every example with every other one
in the batch; ALBEF's ITM draws its negatives from the whole batch; MLM and VQA divide by how
many tokens / answers the batch scores. So we split where the examples are still independent,
at the towers (GradCache, Gao et al. 2021, generalised from embeddings to every tower output):

  1. every micro-batch through the towers, keeping only their outputs (no activations);
  2. the rest of the forward pass (embeddings, fusion, heads) and the loss on the whole batch:
     the loss, its metrics, the gradient of the non-tower parameters, and the gradient of the
     loss with respect to each tower output;
  3. each micro-batch through its towers again, back-propagating that slice of the gradient.

Only the tower outputs that step 2 reads are kept and back-propagated: under CLIP's loss the
towers' token outputs are never computed, as without accumulation (see encoder.Encoder).
The loss, the metrics and the gradient are those of the whole batch, up to float summation
order; the memory of the towers' activations is that of one micro-batch. Heads that run a tower
themselves (MLM on masked text, VQA on the question) do so in step 2, on the whole batch.
Random streams: the heads draw from the step's keys, as without accumulation; the towers'
dropout and augmentation draw from keys folded with the micro-batch index.

Micro-batch j holds the rows j, j + k, j + 2k, ... of the batch, so each micro-batch is spread
over the data-parallel devices as the batch is (no communication to split it).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

from mmfusion.models import towers as towers_lib

PyTree = Any


def split(tree: PyTree, k: int) -> PyTree:
  """[B, ...] leaves -> [k, B / k, ...]: micro-batch j is the rows j, j + k, j + 2k, ..."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), tree)


def merge(tree: PyTree) -> PyTree:
  """The inverse of `split`: [k, B / k, ...] -> [B, ...] in the batch's order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def _differentiable(encoded: Mapping[str, towers_lib.Encoded]):
  """(float outputs, masks): the tower outputs a gradient flows through, and the rest."""
  floats = {m: (e.tokens, e.pooled, e.embedding) for m, e in encoded.items()}
  masks = {m: e.mask for m, e in encoded.items()}
  return floats, masks


def _encoded(floats, masks) -> dict[str, towers_lib.Encoded]:
  return {m: towers_lib.Encoded(tokens=t, mask=masks[m], pooled=p, embedding=e)
          for m, (t, p, e) in floats.items()}


def read_inputs(fn: Callable[..., Any], *args: PyTree) -> list[bool]:
  """Per leaf of `args` (flattened, abstract or concrete): whether `fn` reads it, i.e. whether
  its traced computation, without the equations whose results go nowhere, takes it as an
  input. Sub-computations (jit, scan, ...) count as reading every input they take."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  needed = {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal)}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
  return [v in needed for v in jaxpr.invars]


def value_and_grad(model, params: PyTree, batch: Mapping[str, jax.Array],
                   loss_fn: Callable[[dict[str, Any]], tuple[jax.Array, dict[str, jax.Array]]],
                   rngs: Mapping[str, jax.Array], k: int):
  """((loss, metrics), grads) of `loss_fn(model(batch))` w.r.t. `params`, with the towers run in
  `k` micro-batches (see the module docstring). `model` is a models.model.MultimodalModel."""
  micro = split(batch, k)
  index = jnp.arange(k)

  def towers(p, micro_batch, j):
    keys = {name: jax.random.fold_in(key, j) for name, key in rngs.items()}
    return _differentiable(model.apply({'params': p}, micro_batch, train=True, rngs=keys,
                                       method=type(model).encode_batch))

  def rest(p, floats, masks):
    out = model.apply({'params': p}, batch, _encoded(floats, masks), train=True, rngs=rngs,
                      method=type(model).outputs)
    return loss_fn(out)

  # Which tower outputs step 2 reads (from abstract shapes: nothing is computed here).
  micro_shapes = jax.eval_shape(towers, params, jax.tree.map(lambda x: x[0], micro), index[0])
  floats_shape, masks_shape = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((s.shape[0] * k, *s.shape[1:]), s.dtype), micro_shapes)
  n_params = len(jax.tree.leaves(params))
  n_floats = len(jax.tree.leaves(floats_shape))
  read = read_inputs(rest, params, floats_shape, masks_shape)[n_params:n_params + n_floats]
  floats_def = jax.tree.structure(floats_shape)

  def read_towers(p, micro_batch, j):
    floats, masks = towers(p, micro_batch, j)
    return [x for x, r in zip(jax.tree.leaves(floats), read) if r], masks

  def all_floats(read_leaves):
    """The tower outputs with zeros where step 2 reads nothing (so nothing depends on them)."""
    it = iter(read_leaves)
    return jax.tree.unflatten(floats_def, [
        next(it) if r else jnp.zeros(s.shape, s.dtype)
        for s, r in zip(jax.tree.leaves(floats_shape), read)])

  # 1. The towers' outputs for every micro-batch, without their activations.
  _, (read_floats, masks) = jax.lax.scan(
      lambda _, xs: (None, read_towers(params, *xs)), None, (micro, index))
  read_floats, masks = merge(read_floats), merge(masks)

  # 2. The rest of the pass and the loss on the whole batch.
  (loss, metrics), (grads, d_floats) = jax.value_and_grad(rest, argnums=(0, 1), has_aux=True)(
      params, all_floats(read_floats), masks)
  d_read = [d for d, r in zip(jax.tree.leaves(d_floats), read) if r]

  # 3. Back through the towers, one micro-batch at a time, adding to the gradient.
  def backward(total, xs):
    micro_batch, d_micro, j = xs
    _, pullback = jax.vjp(lambda p: read_towers(p, micro_batch, j)[0], params)
    return jax.tree.map(jnp.add, total, pullback(d_micro)[0]), None

  grads, _ = jax.lax.scan(backward, grads, (micro, split(d_read, k), index))
  return (loss, metrics), grads
