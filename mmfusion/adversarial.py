"""Adversarial training: the step's batch (or the towers' embeddings) perturbed to raise the loss
before the gradient is taken. `config.adversarial.type`:

  'pgd'     pixel space, L-inf (TeCoA-style adversarial fine-tuning of an image tower): `steps`
            of projected gradient ascent with step `step_size` on the images in [0, 1] (before
            their normalisation), within `eps` (both in 1/255 units), from a uniform random
            start; the model is then trained on the perturbed images with the run's own
            objectives (for a contrastive run: the batch's captions as the classes), mixed with
            the clean batch's loss by `clean_weight` (0: adversarial images only, as TeCoA).
  'freelb'  embedding space (FreeLB / VILLA, for fused tasks): `steps` ascent steps on the
            token / patch embeddings of `modalities` (after the position embedding, where the
            towers call `towers.adversarial_hook`), each normalised per example (L2, step
            `step_size`) and projected into a ball of radius `eps`; the parameter gradient is the
            mean over the ascent steps (FreeLB's "free" training), and `kl_weight` adds VILLA's
            symmetric KL between the clean and the perturbed predictions of every head with
            [B, C] logits.

Evaluation under attack lives in mmfusion/evals/robustness.py (the same `pgd_linf`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
TYPES = ('', 'pgd', 'freelb')
COLLECTION = 'adversarial'     # the Flax collection the embedding perturbations travel in



def validate(options: Mapping[str, Any], towers: Mapping[str, Any], accum_steps: int) -> None:
  """Fails naming the key of config.adversarial that is wrong."""
  kind = options['type']
  if kind not in TYPES:
    raise ValueError(f'config.adversarial.type = {kind!r}; expected one of {TYPES}.')
  if not kind:
    return
  for key in ('eps', 'step_size'):
    if not options[key] > 0:
      raise ValueError(f'config.adversarial.{key} = {options[key]}: must be > 0.')
  if not (isinstance(options['steps'], int) and options['steps'] >= 1):
    raise ValueError(f"config.adversarial.steps = {options['steps']!r}: must be an integer >= 1.")
  clean = options.get('clean_weight', 0.0)
  if not 0.0 <= clean < 1.0 or (clean and kind != 'pgd'):
    raise ValueError(f"config.adversarial.clean_weight = {clean}: must be in [0, 1), and mixes "
                     "the clean loss into type 'pgd'.")
  if options['kl_weight'] < 0 or (options['kl_weight'] and kind != 'freelb'):
    raise ValueError(f"config.adversarial.kl_weight = {options['kl_weight']}: must be >= 0, and "
                     "is VILLA's term of type 'freelb'.")
  modalities = tuple(options['modalities'])
  unknown = [m for m in modalities if m not in towers]
  if not modalities or unknown:
    raise ValueError(f'config.adversarial.modalities = {modalities}: name towers of '
                     f'config.model.towers ({sorted(towers)}).')
  if kind == 'pgd' and any(dict(towers[m]).get('type') != 'vit' for m in modalities):
    raise ValueError("config.adversarial.type = 'pgd' perturbs pixels: its modalities must be "
                     f'image towers (vit); got {modalities}.')
  if accum_steps > 1:
    raise ValueError('config.adversarial with config.accum_steps > 1 is not supported: the attack '
                     'needs the whole batch at once.')


def pgd_linf(loss_fn: Callable[[Array], Array], x01: Array, eps: float, step_size: float,
             steps: int, key: Array, random_start: bool = True,
             failed: Callable[[Array], Array] | None = None) -> tuple[Array, Array | None]:
  """Projected gradient ascent on `loss_fn` (images in [0, 1] -> a scalar, the sum over the
  batch so that each image's gradient is its own) within an L-inf ball of radius `eps`, kept in
  [0, 1]. Returns the last iterate and, with `failed` (images -> bool [B]: the model is wrong on
  them), whether any iterate fooled the model per example (an adversarial example found at any
  step counts, as AutoAttack keeps its best)."""
  delta = (jax.random.uniform(key, x01.shape, x01.dtype, -eps, eps) if random_start
           else jnp.zeros_like(x01))
  x = jnp.clip(x01 + delta, 0.0, 1.0)
  fooled = failed(x) if failed is not None else None

  def step(_, carry):
    x, fooled = carry
    grad = jax.grad(loss_fn)(x)
    x = jnp.clip(x + step_size * jnp.sign(grad), x01 - eps, x01 + eps)
    x = jnp.clip(x, 0.0, 1.0)
    if failed is not None:
      fooled = fooled | failed(x)
    return x, fooled

  x, fooled = jax.lax.fori_loop(0, steps, step, (x, fooled))
  return jax.lax.stop_gradient(x), fooled


def perturb_pixels(options: Mapping[str, Any], mean: Array, std: Array,
                   loss_of_batch: Callable[[dict[str, Array]], Array],
                   batch: Mapping[str, Array], key: Array) -> dict[str, Array]:
  """The batch with the images of `options.modalities` replaced by their PGD adversaries."""
  batch = dict(batch)
  for i, m in enumerate(options['modalities']):
    x01 = batch[m] * std + mean

    def loss(x, m=m):
      return loss_of_batch({**batch, m: (x - mean) / std})

    adv, _ = pgd_linf(loss, x01, options['eps'] / 255.0, options['step_size'] / 255.0,
                      options['steps'], jax.random.fold_in(key, i))
    batch[m] = ((adv - mean) / std).astype(batch[m].dtype)
  return batch


def pgd_value_and_grad(model: Any, params: Any, batch: Mapping[str, Array],
                       loss_of: Callable[..., tuple[Array, dict[str, Array]]],
                       rngs: Mapping[str, Array], options: Mapping[str, Any], key: Array,
                       mean: Array, std: Array):
  """((loss, metrics), grads) on the batch's PGD adversaries against `params` (`loss_of(out,
  batch)` is the run's objectives), mixed with the clean loss by `options.clean_weight`."""
  def loss_on(p, b):
    return loss_of(model.apply({'params': p}, b, train=True, rngs=rngs), b)

  attacked = perturb_pixels(options, mean, std, lambda b: loss_on(params, b)[0], batch, key)
  weight = options.get('clean_weight', 0.0)

  def total(p):
    loss, metrics = loss_on(p, attacked)
    metrics = {**metrics, 'adversarial/loss': loss}
    if weight:
      clean, _ = loss_on(p, batch)
      loss = (1.0 - weight) * loss + weight * clean
      metrics = {**metrics, 'adversarial/clean_loss': clean}
    return loss, {**metrics, 'loss': loss} if 'loss' in metrics else metrics
  return jax.value_and_grad(total, has_aux=True)(params)


def _per_example_norm(x: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-12)


def _symmetric_kl(clean: Mapping[str, Any], adv: Mapping[str, Any]) -> Array:
  """VILLA's term: sum over heads with [B, C] logits of KL(p||q) + KL(q||p), batch mean."""
  total = jnp.zeros((), jnp.float32)
  for name, out in clean.items():
    if not (isinstance(out, Mapping) and 'logits' in out and out['logits'].ndim == 2):
      continue
    p = jax.nn.log_softmax(jax.lax.stop_gradient(out['logits']).astype(jnp.float32))
    q = jax.nn.log_softmax(adv[name]['logits'].astype(jnp.float32))
    total += jnp.mean(jnp.sum(jnp.exp(p) * (p - q) + jnp.exp(q) * (q - p), axis=-1))
  return total


def freelb_value_and_grad(model: Any, params: Any, batch: Mapping[str, Array],
                          loss_of: Callable[[dict[str, Any]], tuple[Array, dict[str, Array]]],
                          rngs: Mapping[str, Array], options: Mapping[str, Any], key: Array):
  """((loss, metrics), grads) of FreeLB (+ VILLA's KL): see the module docstring."""
  modalities = tuple(options['modalities'])
  eps, alpha, steps = options['eps'], options['step_size'], options['steps']
  # The perturbation's shapes: what the towers' hooks would add (zeros), from a traced apply.
  _, shapes = jax.eval_shape(lambda p: model.apply({'params': p}, batch, train=True, rngs=rngs,
                                                   mutable=[COLLECTION]), params)
  shapes = {m: v for m, v in shapes[COLLECTION].items() if m in modalities}
  missing = sorted(set(modalities) - set(shapes))
  if missing:
    raise ValueError(f'config.adversarial.modalities {missing}: their towers have no embedding '
                     'hook (towers.adversarial_hook), so they cannot be perturbed.')

  def masked(delta):
    out = {}
    for m, tree in delta.items():
      mask = batch.get(f'{m}_mask')
      d = tree['embedded']
      if mask is not None and mask.shape == d.shape[:2]:
        d = d * mask[:, :, None].astype(d.dtype)
      out[m] = {'embedded': d}
    return out

  keys = jax.random.split(key, len(shapes))
  delta = masked({m: {'embedded': jax.random.uniform(k, s['embedded'].shape, jnp.float32, -1, 1)
                      * eps / jnp.sqrt(float(s['embedded'].size // s['embedded'].shape[0]))}
                  for k, (m, s) in zip(keys, shapes.items())})
  clean = (jax.lax.stop_gradient(model.apply({'params': params}, batch, train=True, rngs=rngs))
           if options['kl_weight'] else None)

  def loss_fn(p, d):
    out = model.apply({'params': p, COLLECTION: d}, batch, train=True, rngs=rngs)
    loss, metrics = loss_of(out)
    if clean is not None:
      kl = _symmetric_kl(clean, out)
      metrics = {**metrics, 'adversarial/kl': kl}
      loss = loss + options['kl_weight'] * kl
    return loss, metrics

  grads_sum, loss_sum, metrics = None, 0.0, None
  for _ in range(steps):
    (loss, metrics), (g_params, g_delta) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, delta)
    grads_sum = g_params if grads_sum is None else jax.tree.map(jnp.add, grads_sum, g_params)
    loss_sum += loss
    # Ascent: each example's step normalised (L2 over its tokens), then projected to radius eps.
    delta = jax.tree.map(lambda d, g: d + alpha * g / _per_example_norm(g), delta, g_delta)
    delta = jax.tree.map(lambda d: d * jnp.minimum(1.0, eps / _per_example_norm(d)), delta)
    delta = masked(jax.lax.stop_gradient(delta))
  grads = jax.tree.map(lambda g: g / steps, grads_sum)
  return (loss_sum / steps, metrics), grads
