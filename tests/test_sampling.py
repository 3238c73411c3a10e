"""In-batch hard negatives and BERT masking (mmfusion/models/sampling.py): invariants that
must hold for every draw, and the distributions against their closed forms."""
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion.models import sampling

EOS, FIRST_NORMAL = 3, 4


def _keys(seed, n):
  return jax.random.split(jax.random.key(seed), n)


# One key per draw, all rows at once: [n, B] sampled columns.
_draws = jax.jit(jax.vmap(sampling.hard_negatives, in_axes=(0, None)))


def _softmax_off_diagonal(sim):
  logits = np.where(np.eye(len(sim), dtype=bool), -np.inf, sim)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  return p / p.sum(axis=1, keepdims=True)


def _chi_square(counts, p):
  expected = counts.sum() * p
  keep = expected > 0
  assert np.all(counts[~keep] == 0), 'drew a column of probability 0'
  return np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]), keep.sum() - 1


# -- hard negatives ---------------------------------------------------------------------------

SIM_KINDS = ('normal', 'huge_diagonal', 'inf_diagonal', 'ties', 'one_column', 'inf_column',
             'all_neginf', 'huge_ties', 'nan_diagonal')


def _sim(kind, b, rng):
  """A [B, B] similarity matrix of one adversarial kind, and for 'one_column' the only column
  each row may draw (else None)."""
  sim = rng.normal(size=(b, b)).astype(np.float32) * rng.choice([0.1, 1.0, 30.0])
  only = None
  if kind == 'huge_diagonal':
    np.fill_diagonal(sim, 1e30)
  elif kind == 'inf_diagonal':
    np.fill_diagonal(sim, np.inf)
  elif kind == 'nan_diagonal':
    np.fill_diagonal(sim, np.nan)
  elif kind == 'ties':
    sim = rng.integers(0, 2, size=(b, b)).astype(np.float32)
    np.fill_diagonal(sim, 1.0)
  elif kind == 'huge_ties':
    sim = np.full((b, b), 3e38, np.float32)
  elif kind == 'one_column':
    only = (np.arange(b) + rng.integers(1, b, size=b)) % b          # never the row itself
    sim = np.full((b, b), -np.inf, np.float32)
    sim[np.arange(b), only] = rng.normal(size=b)
    np.fill_diagonal(sim, 1e3)
  elif kind == 'inf_column':   # +inf beats every finite similarity
    only = (np.arange(b) + rng.integers(1, b, size=b)) % b
    sim[np.arange(b), only] = np.inf
  elif kind == 'all_neginf':
    sim = np.full((b, b), -np.inf, np.float32)
    np.fill_diagonal(sim, 0.0)
  return sim, only


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(b=st.integers(2, 16), kind=st.sampled_from(SIM_KINDS),
                  seed=st.integers(0, 2**31 - 1))
def test_hard_negatives_never_return_the_positive(b, kind, seed):
  sim, only = _sim(kind, b, np.random.default_rng(seed))
  idx = np.asarray(_draws(_keys(seed, 32), jnp.asarray(sim)))    # [32, B]
  assert idx.dtype == np.int32 and idx.shape == (32, b)
  assert np.all((idx >= 0) & (idx < b))
  assert not np.any(idx == np.arange(b)), f'{kind}: a row drew its own positive'
  if only is not None:
    np.testing.assert_array_equal(idx, np.broadcast_to(only, idx.shape))


def test_hard_negatives_pick_a_strongly_peaked_column():
  b, n = 8, 2000
  rng = np.random.default_rng(0)
  peak = (np.arange(b) + rng.integers(1, b, size=b)) % b
  sim = np.zeros((b, b), np.float32)
  sim[np.arange(b), peak] = 10.0                 # p = e^10 / (e^10 + 6) ~ 0.9997
  np.fill_diagonal(sim, 50.0)                    # the positive is far more similar still
  idx = np.asarray(_draws(_keys(1, n), jnp.asarray(sim)))
  assert np.all((idx == peak).mean(axis=0) > 0.99)


@pytest.mark.parametrize('b', [2, 3, 5])
def test_hard_negatives_follow_softmax_over_the_other_columns(b):
  n = 20_000
  rng = np.random.default_rng(b)
  sim = rng.normal(size=(b, b)).astype(np.float32)
  np.fill_diagonal(sim, 5.0)                     # large positives must not change the others' odds
  idx = np.asarray(_draws(_keys(b, n), jnp.asarray(sim)))
  p = _softmax_off_diagonal(sim)
  for row in range(b):
    counts = np.bincount(idx[:, row], minlength=b)
    chi2, dof = _chi_square(counts, p[row])
    # Fixed seed, so deterministic; the bound is far in the tail of chi2(dof <= 4) (p < 1e-5).
    assert chi2 < 30.0, (row, counts, p[row] * n, chi2, dof)


def test_negatives_for_both_sample_rows_and_columns():
  b, n = 4, 20_000
  rng = np.random.default_rng(7)
  sim = rng.normal(size=(b, b)).astype(np.float32) * 2
  draw = jax.jit(jax.vmap(sampling.negatives_for_both, in_axes=(0, None)))
  text_for_image, image_for_text = map(np.asarray, draw(_keys(3, n), jnp.asarray(sim)))
  assert not np.any(text_for_image == np.arange(b))
  assert not np.any(image_for_text == np.arange(b))
  # Separate keys: the two directions are not the same draw.
  assert np.mean(text_for_image == image_for_text) < 0.6
  for idx, p in ((text_for_image, _softmax_off_diagonal(sim)),
                 (image_for_text, _softmax_off_diagonal(sim.T))):
    for row in range(b):
      chi2, _ = _chi_square(np.bincount(idx[:, row], minlength=b), p[row])
      assert chi2 < 30.0


def test_hard_negatives_pass_no_gradient_and_check_the_batch():
  sim = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)), jnp.float32)
  key = jax.random.key(0)
  picked = lambda s: s[jnp.arange(5), sampling.hard_negatives(key, s)]
  # The gradient is the gather's alone: one 1 per row at the drawn column, none through the draw.
  grad = jax.grad(lambda s: jnp.sum(picked(s)))(sim)
  expected = np.zeros((5, 5), np.float32)
  expected[np.arange(5), np.asarray(sampling.hard_negatives(key, sim))] = 1.0
  np.testing.assert_array_equal(grad, expected)
  with pytest.raises(ValueError, match='B=1'):
    sampling.hard_negatives(jax.random.key(0), jnp.zeros((1, 1)))
  with pytest.raises(ValueError, match='square'):
    sampling.hard_negatives(jax.random.key(0), jnp.zeros((3, 4)))


# -- token masking ----------------------------------------------------------------------------

def _texts(rng, b, l, vocab_size, avoid=()):
  """Token ids [B, L] like the tokenizer's (real tokens, EOS last, pads after), with some
  unk/bos ids among the real tokens and some rows holding only EOS or nothing at all."""
  lengths = rng.integers(0, l + 1, size=b)                  # real tokens, EOS included
  ids = rng.integers(FIRST_NORMAL, vocab_size, size=(b, l))
  for a in avoid:   # keep ids apart from an in-range mask id, so changes are unambiguous
    ids = np.where(ids == a, FIRST_NORMAL, ids)
  ids = np.where(rng.random((b, l)) < 0.05, rng.integers(1, 3, size=(b, l)), ids)   # unk, bos
  pos = np.arange(l)[None, :]
  mask = pos < lengths[:, None]
  ids = np.where(pos == lengths[:, None] - 1, EOS, ids)
  ids = np.where(mask, ids, 0)
  return ids.astype(np.int32), mask


def _candidates(ids, mask):
  return mask & (ids >= FIRST_NORMAL) & (ids != EOS)


def _check_invariants(ids, mask, inputs, targets, weights, *, mask_id, vocab_size):
  selected = weights > 0
  np.testing.assert_array_equal(targets, ids)
  assert weights.dtype == np.float32 and set(np.unique(weights)) <= {0.0, 1.0}
  assert not np.any(selected & ~_candidates(ids, mask)), 'selected a pad, EOS or special'
  np.testing.assert_array_equal(inputs[~selected], ids[~selected])
  replaced = selected & (inputs != mask_id) & (inputs != ids)
  assert np.all(inputs[replaced] >= FIRST_NORMAL) and np.all(inputs[replaced] < vocab_size)
  has_candidate = _candidates(ids, mask).any(axis=1)
  np.testing.assert_array_equal(selected.any(axis=1), has_candidate)   # at least one per row
  return selected, replaced


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), rate=st.sampled_from([0.0, 0.01, 0.15, 1.0]),
                  mask_inside=st.booleans())
def test_mask_tokens_invariants(seed, rate, mask_inside):
  vocab_size = 12
  mask_id = 7 if mask_inside else vocab_size
  ids, mask = _texts(np.random.default_rng(seed), 16, 6, vocab_size, avoid=(mask_id,))
  inputs, targets, weights = map(np.asarray, sampling.mask_tokens(
      jax.random.key(seed), jnp.asarray(ids), jnp.asarray(mask), mask_id=mask_id,
      vocab_size=vocab_size, rate=rate))
  selected, _ = _check_invariants(ids, mask, inputs, targets, weights, mask_id=mask_id,
                                  vocab_size=vocab_size)
  if rate == 0.0:   # only the forced one
    np.testing.assert_array_equal(selected.sum(axis=1), _candidates(ids, mask).any(axis=1))
  if rate == 1.0:
    np.testing.assert_array_equal(selected, _candidates(ids, mask))


def _binomial_ok(observed, n, p, sigmas=5.0):
  return abs(observed - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize('mask_id,vocab_size', [(50, 50), (20, 50)])
def test_mask_tokens_statistics(mask_id, vocab_size):
  rate, b, l = 0.15, 4000, 24
  ids, mask = _texts(np.random.default_rng(0), b, l, vocab_size, avoid=(mask_id,))
  fn = jax.jit(functools.partial(sampling.mask_tokens, mask_id=mask_id, vocab_size=vocab_size))
  inputs, targets, weights = map(np.asarray, fn(jax.random.key(1), jnp.asarray(ids),
                                                jnp.asarray(mask)))
  selected, replaced = _check_invariants(ids, mask, inputs, targets, weights, mask_id=mask_id,
                                         vocab_size=vocab_size)
  assert not np.any(inputs[replaced] == mask_id)

  # Selection: per row, Y = max(Binomial(n, rate), 1) for n >= 1 candidates (the forced one).
  n = _candidates(ids, mask).sum(axis=1)
  n = n[n > 0]
  none = (1 - rate) ** n
  mean = np.sum(n * rate + none)
  var = np.sum(n * rate * (1 - rate) + (n * rate) ** 2 + none - (n * rate + none) ** 2)
  assert abs(selected.sum() - mean) <= 5 * np.sqrt(var), (selected.sum(), mean, np.sqrt(var))

  # Of the selected: 80% [MASK], 10% random (which may redraw the original), 10% unchanged.
  num_random = vocab_size - FIRST_NORMAL - (1 if mask_id < vocab_size else 0)
  s = selected.sum()
  to_mask = selected & (inputs == mask_id)
  assert _binomial_ok(to_mask.sum(), s, 0.8)
  assert _binomial_ok(replaced.sum(), s, 0.1 * (1 - 1 / num_random))
  assert _binomial_ok((selected & (inputs == ids)).sum(), s, 0.1 + 0.1 / num_random)
  # Replacements cover the allowed ids, and only those.
  allowed = set(range(FIRST_NORMAL, vocab_size)) - {mask_id}
  assert set(np.unique(inputs[replaced])) == allowed


def test_mask_tokens_never_selects_eos():
  # EOS is excluded by id too, not only as a special below first_normal_id.
  ids = jnp.array([[5, 3, 6, 3]], jnp.int32)
  _, _, weights = sampling.mask_tokens(jax.random.key(0), ids, jnp.ones((1, 4), bool), mask_id=9,
                                       vocab_size=9, first_normal_id=3, rate=1.0)
  np.testing.assert_array_equal(weights, [[1.0, 0.0, 1.0, 0.0]])


def test_mask_tokens_rejects_bad_settings():
  ids = jnp.full((2, 3), 5, jnp.int32)
  mask = jnp.ones((2, 3), bool)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='rate'):
    sampling.mask_tokens(key, ids, mask, mask_id=9, vocab_size=9, rate=1.5)
  with pytest.raises(ValueError, match='mask_prob'):
    sampling.mask_tokens(key, ids, mask, mask_id=9, vocab_size=9, mask_prob=0.95)
  with pytest.raises(ValueError, match='random replacements'):
    sampling.mask_tokens(key, ids, mask, mask_id=4, vocab_size=5)
