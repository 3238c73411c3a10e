"""Random choices the fused tasks make inside the forward pass: ALBEF's in-batch hard negatives
for image-text matching, and BERT's token masking for masked language modelling.

Pure functions of a PRNG key and arrays; every check on shapes and settings happens at trace
time, so they jit (and run under any batch sharding) like the rest of the model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfusion.vocab import EOS_ID, FIRST_NORMAL_ID

Array = jax.Array


def hard_negatives(rng: Array, sim_bb: Array) -> Array:
  """For each row i of a [B, B] similarity matrix, one column j != i drawn with probability
  softmax(sim[i, j]) over the columns j != i (ALBEF's in-batch hard negatives).

  Rows are queries (e.g. image i against every text); the diagonal holds the positives and is
  never returned, whatever its value. The similarities are a sampling distribution, not a
  differentiable input: no gradient flows back through them. `sim_bb` holds logits, so scale
  cosine similarities by the contrastive temperature first (ALBEF samples softmax(sim / tau)):
  raw cosines in [-1, 1] give a near-uniform choice.

  Degenerate rows stay well defined: one whose off-diagonal entries are all -inf (or NaN) draws
  uniformly among the other columns; +inf entries count as the largest finite value, so such a
  row draws among its +inf columns.

  Returns idx_b [B] int32.
  """
  if sim_bb.ndim != 2 or sim_bb.shape[0] != sim_bb.shape[1]:
    raise ValueError(f'hard_negatives: sim must be a square [B, B] matrix; got shape '
                     f'{sim_bb.shape}.')
  b = sim_bb.shape[0]
  if b < 2:
    raise ValueError(f'hard_negatives: batch size B={b}; in-batch negatives need B >= 2 '
                     '(a row has no column other than its positive).')
  sim_bb = jax.lax.stop_gradient(sim_bb).astype(jnp.float32)
  off_diagonal_bb = ~jnp.eye(b, dtype=bool)
  # NaN -> -inf (never drawn), +-inf -> the largest finite values, so that subtracting the row
  # maximum below cannot make inf - inf = NaN.
  finfo = jnp.finfo(jnp.float32)
  sim_bb = jnp.nan_to_num(sim_bb, nan=-jnp.inf, posinf=finfo.max, neginf=-jnp.inf)
  logits_bb = jnp.where(off_diagonal_bb, sim_bb, -jnp.inf)
  row_max_b1 = jnp.max(logits_bb, axis=1, keepdims=True)
  # A row with nothing drawable off the diagonal would make categorical's argmax land on
  # column 0, which is row 0's own positive: such rows draw uniformly among the others.
  empty_b1 = row_max_b1 == -jnp.inf
  logits_bb = jnp.where(empty_b1, jnp.where(off_diagonal_bb, 0.0, -jnp.inf),
                        logits_bb - jnp.where(empty_b1, 0.0, row_max_b1))
  # Shifted so each row's largest logit is 0: the Gumbel noise categorical adds is not lost
  # to rounding next to huge similarities (ties among them then stay fair).
  return jax.random.categorical(rng, logits_bb, axis=1).astype(jnp.int32)


def negatives_for_both(rng: Array, sim_ab: Array) -> tuple[Array, Array]:
  """Hard negatives in both directions of a [B, B] image-text similarity matrix.

  Returns (text_for_image [B], image_for_text [B]) int32: for image i a text index != i drawn
  from row i of sim, and for text j an image index != j drawn from column j (row j of sim.T),
  with independent keys.
  """
  rng_text, rng_image = jax.random.split(rng)
  return hard_negatives(rng_text, sim_ab), hard_negatives(rng_image, sim_ab.T)


def mask_tokens(rng: Array, ids_bl: Array, mask_bl: Array, *, mask_id: int, vocab_size: int,
                first_normal_id: int = FIRST_NORMAL_ID, rate: float = 0.15,
                mask_prob: float = 0.8, random_prob: float = 0.1,
                ) -> tuple[Array, Array, Array]:
  """BERT's masking of a batch of token ids [B, L] (mask_bl True on real tokens).

  Candidates are the real tokens that are not EOS or another special id (< first_normal_id).
  Each is selected with probability `rate`; a row with candidates but no selected one gets its
  candidate with the smallest draw selected (a uniform choice among its candidates), so every
  row with text scores at least one token. The expected number selected in a row with n
  candidates is therefore n * rate + (1 - rate)^n, slightly above n * rate for short texts.
  Of the selected tokens, a fraction `mask_prob` becomes `mask_id`, `random_prob` a token
  drawn uniformly from [first_normal_id, vocab_size) minus mask_id (never a special id), and
  the rest stays unchanged (but is still predicted). Everything else is left as it was.

  Returns (inputs_bl, with ids_bl's dtype; targets_bl = ids_bl; weights_bl float32, 1.0
  exactly at the selected positions).
  """
  if ids_bl.shape != mask_bl.shape or ids_bl.ndim != 2:
    raise ValueError(f'mask_tokens: ids {ids_bl.shape} and mask {mask_bl.shape} must both be '
                     '[B, L].')
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'mask_tokens: rate={rate}; must be in [0, 1].')
  if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1.0:
    raise ValueError(f'mask_tokens: mask_prob={mask_prob}, random_prob={random_prob}; each '
                     'must be >= 0 and their sum <= 1.')
  # Random replacements come from [first_normal_id, vocab_size) with mask_id taken out.
  skips_mask = first_normal_id <= mask_id < vocab_size
  num_random = vocab_size - first_normal_id - int(skips_mask)
  if random_prob > 0 and num_random < 1:
    raise ValueError(f'mask_tokens: no token to draw random replacements from: vocab_size='
                     f'{vocab_size}, first_normal_id={first_normal_id}, mask_id={mask_id}.')

  rng_select, rng_kind, rng_random = jax.random.split(rng, 3)
  mask_bl = mask_bl.astype(bool)
  candidate_bl = mask_bl & (ids_bl >= first_normal_id) & (ids_bl != EOS_ID)
  draw_bl = jax.random.uniform(rng_select, ids_bl.shape)
  selected_bl = candidate_bl & (draw_bl < rate)
  # At least one per row: the candidate whose draw came closest to selection.
  closest_bl = jax.nn.one_hot(jnp.argmin(jnp.where(candidate_bl, draw_bl, jnp.inf), axis=1),
                              ids_bl.shape[1], dtype=bool)
  needs_one_b1 = (jnp.any(candidate_bl, axis=1) & ~jnp.any(selected_bl, axis=1))[:, None]
  selected_bl = selected_bl | (needs_one_b1 & closest_bl & candidate_bl)

  kind_bl = jax.random.uniform(rng_kind, ids_bl.shape)
  to_mask_bl = selected_bl & (kind_bl < mask_prob)
  to_random_bl = selected_bl & (kind_bl >= mask_prob) & (kind_bl < mask_prob + random_prob)
  random_bl = jax.random.randint(rng_random, ids_bl.shape, 0, max(num_random, 1)) + first_normal_id
  if skips_mask:   # shift the ids from mask_id up by one: uniform over the rest, never mask_id
    random_bl = random_bl + (random_bl >= mask_id)
  inputs_bl = jnp.where(to_mask_bl, jnp.asarray(mask_id, ids_bl.dtype), ids_bl)
  inputs_bl = jnp.where(to_random_bl, random_bl.astype(ids_bl.dtype), inputs_bl)
  return inputs_bl, ids_bl, selected_bl.astype(jnp.float32)
