"""Tests for mmfusion/models/decoder.py: the teacher-forced decoder is causal and ignores padded
context; cached decoding equals uncached decoding step for step and token for token; beam search
is greedy at beam 1 and exact (against brute force) with a beam wide enough. Tiny sizes, CPU.
"""
from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion.models import decoder as decoder_lib
from mmfusion.models import layers

B, N, WC, MAX_LEN = 3, 5, 12, 6
EOS, BOS, PAD = decoder_lib.EOS_ID, decoder_lib.BOS_ID, decoder_lib.PAD_ID


def make_decoder(vocab_size=13, max_len=MAX_LEN, **stack):
  """A tiny decoder; `stack` changes its StackOptions (sizes, dtypes, attention)."""
  options = layers.StackOptions(**{**dict(width=16, depth=2, mlp_dim=32, num_heads=2), **stack})
  return decoder_lib.TextDecoder(vocab_size=vocab_size, max_len=max_len, stack=options)


def make_context(seed=0, batch=B):
  """Context [B, N, WC] and a mask with some padding (every row keeps its first token)."""
  rng = np.random.default_rng(seed)
  mask = rng.random((batch, N)) < 0.6
  mask[:, 0] = True
  return jnp.asarray(rng.normal(size=(batch, N, WC)), jnp.float32), jnp.asarray(mask)


# Everything runs jitted (the decoder is a static, hashable argument): op-by-op dispatch
# compiles each op for each shape, which is many times slower on CPU at these sizes.
jit = lambda f, *static: jax.jit(f, static_argnums=0, static_argnames=static)
greedy = jit(decoder_lib.greedy_decode, 'max_len')
uncached = jit(decoder_lib.decode_uncached, 'max_len')
beam_search = jit(decoder_lib.beam_search, 'max_len', 'beam_size', 'length_penalty')


@functools.partial(jax.jit, static_argnums=0)
def random_params(decoder, seed=0, noise=0.3):
  """Init params plus noise: the init's tiny embeddings give near-flat, context-blind logits;
  noisy ones make every position and context matter, and argmax ties unlikely. (Much more
  noise makes float32 round-off, not the cache, the larger error between the two paths.)"""
  context_bnw, mask_bn = make_context(batch=1)
  inputs_bl = jnp.zeros((1, decoder.max_len), jnp.int32)
  key_init, key_noise = jax.random.split(jax.random.key(seed))
  params = nn.unbox(decoder.init(key_init, inputs_bl, context_bnw, mask_bn))['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key_noise, len(leaves))
  return treedef.unflatten(
      [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.partial(jax.jit, static_argnums=0)
def teacher_forced(decoder, params, tokens_bl, context_bnw, mask_bn):
  inputs_bl = jnp.concatenate([jnp.full_like(tokens_bl[:, :1], BOS), tokens_bl[:, :-1]], axis=1)
  return decoder.apply({'params': params}, inputs_bl, context_bnw, mask_bn)


def assert_pad_after_eos(tokens_bl):
  for row in np.asarray(tokens_bl):
    ends = np.flatnonzero(row == EOS)
    if ends.size:
      assert np.all(row[ends[0] + 1:] == PAD), row


# ----------------------------------------------------------------------------- the module


def test_every_param_has_logical_axis_names():
  decoder = make_decoder()
  context_bnw, mask_bn = make_context()
  boxed = jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((B, 4), jnp.int32),
                         context_bnw, mask_bn)['params']
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(boxed), is_leaf=is_spec)
  values = jax.tree_util.tree_leaves(nn.unbox(boxed))
  assert len(specs) == len(values)
  for (path, spec), value in zip(specs, values):
    name = jax.tree_util.keystr(path)
    assert is_spec(spec) and len(spec) == value.ndim, f'{name}: {spec} for {value.shape}'
    assert set(spec) <= set(layers.LOGICAL_AXES) | {None}, f'{name}: {spec}'
  assert set(boxed) == {'token_embedding', 'pos_embedding', 'context_proj', 'block_0', 'block_1',
                        'decoder_norm', 'logits'}


def test_causal_and_context_padding_ignored():
  decoder = make_decoder()
  params = random_params(decoder)
  context_bnw, mask_bn = make_context()
  tokens_bl = jnp.asarray(np.random.default_rng(1).integers(0, 13, (B, MAX_LEN)), jnp.int32)
  logits_blv = teacher_forced(decoder, params, tokens_bl, context_bnw, mask_bn)
  assert logits_blv.shape == (B, MAX_LEN, 13) and logits_blv.dtype == jnp.float32

  # Input position 3 is target 2: changing it may change only positions 3 and later.
  changed_bl = tokens_bl.at[:, 2].set((tokens_bl[:, 2] + 1) % 13)
  changed_blv = teacher_forced(decoder, params, changed_bl, context_bnw, mask_bn)
  np.testing.assert_allclose(changed_blv[:, :3], logits_blv[:, :3], atol=1e-6)
  assert not np.allclose(changed_blv[:, 3:], logits_blv[:, 3:], atol=1e-3)

  garbage_bnw = jnp.where(mask_bn[..., None], context_bnw, 1e3)
  np.testing.assert_allclose(
      teacher_forced(decoder, params, tokens_bl, garbage_bnw, mask_bn), logits_blv, atol=1e-5)
  np.testing.assert_array_equal(
      greedy(decoder, params, garbage_bnw, mask_bn, max_len=MAX_LEN),
      greedy(decoder, params, context_bnw, mask_bn, max_len=MAX_LEN))


def test_cached_steps_equal_full_sequence():
  decoder = make_decoder()
  params = random_params(decoder)
  context_bnw, mask_bn = make_context()
  mask_bn = mask_bn.at[2].set(False)   # a row with nothing to attend to: zeros in both paths
  inputs_bl = jnp.asarray(np.random.default_rng(2).integers(0, 13, (B, MAX_LEN)), jnp.int32)
  full_blv = decoder.apply({'params': params}, inputs_bl, context_bnw, mask_bn)

  cache = decoder_lib.init_cache(decoder, params, B, context_bnw, mask_bn)
  assert int(cache['cache_index']) == 0
  assert cache['block_0']['self_attn']['cached_key'].shape == (B, MAX_LEN, 2, 8)
  assert not np.any(cache['block_0']['self_attn']['cached_key'])
  assert cache['block_1']['cross_attn']['context_key'].shape == (B, N, 2, 8)
  steps = []
  for t in range(MAX_LEN):
    logits_b1v, variables = decoder.apply(
        {'params': params, 'cache': cache}, inputs_bl[:, t:t + 1], None, mask_bn, decode=True,
        mutable=['cache'])
    cache = variables['cache']
    steps.append(logits_b1v[:, 0])
  assert int(cache['cache_index']) == MAX_LEN
  np.testing.assert_allclose(jnp.stack(steps, axis=1), full_blv, atol=1e-5)


def test_bad_calls_raise():
  decoder = make_decoder()
  params = random_params(decoder)
  context_bnw, mask_bn = make_context()
  with pytest.raises(ValueError, match='one token per step'):
    decoder.apply({'params': params}, jnp.zeros((B, 2), jnp.int32), context_bnw, mask_bn,
                  decode=True, mutable=['cache'])
  with pytest.raises(ValueError, match='max_len'):
    decoder.apply({'params': params}, jnp.zeros((B, MAX_LEN + 1), jnp.int32), context_bnw,
                  mask_bn)
  with pytest.raises(ValueError, match='max_len'):
    greedy(decoder, params, context_bnw, mask_bn, max_len=MAX_LEN + 1)


# ----------------------------------------------------------------------------- greedy


def ending_part_way(decoder, params, context_bnw, mask_bn):
  """`params` with the EOS bias raised just enough that greedy decoding writes EOS at a step
  t >= 1 of some row (returned with t): a random decoder rarely ends before max_len."""
  path_bl = np.asarray(uncached(decoder, params, context_bnw, mask_bn, max_len=MAX_LEN))
  logits_blv = np.asarray(teacher_forced(decoder, params, path_bl, context_bnw, mask_bn))
  margin_bl = logits_blv.max(-1) - logits_blv[..., EOS]   # how far EOS is from the argmax
  lowest_bl = np.minimum.accumulate(margin_bl, axis=1)
  # Row b ends at t if the raise passes margin[b, t] but none of its earlier margins.
  b, t = next((b, t) for b in range(len(margin_bl)) for t in range(1, MAX_LEN - 1)
              if EOS not in path_bl[b] and margin_bl[b, t] < lowest_bl[b, t - 1])
  raised = jax.tree.map(lambda x: x, params)
  raised['logits']['bias'] = raised['logits']['bias'].at[EOS].add(
      (margin_bl[b, t] + lowest_bl[b, t - 1]) / 2)
  return raised, b, t


@pytest.mark.parametrize('seed', [0, 1])
def test_greedy_cached_equals_uncached(seed):
  decoder = make_decoder()
  params = random_params(decoder, seed)
  context_bnw, mask_bn = make_context(seed, batch=4)
  for p in (params, ending_part_way(decoder, params, context_bnw, mask_bn)[0]):
    cached_bl = greedy(decoder, p, context_bnw, mask_bn, max_len=MAX_LEN)
    uncached_bl = uncached(decoder, p, context_bnw, mask_bn, max_len=MAX_LEN)
    assert cached_bl.shape == (4, MAX_LEN) and cached_bl.dtype == jnp.int32
    np.testing.assert_array_equal(cached_bl, uncached_bl)
  # Shorter than the decoder's max_len too.
  np.testing.assert_array_equal(
      greedy(decoder, params, context_bnw, mask_bn, max_len=3),
      uncached(decoder, params, context_bnw, mask_bn, max_len=3))


def test_eos_then_pad():
  decoder = make_decoder()
  context_bnw, mask_bn = make_context(batch=4)
  params, row, step = ending_part_way(decoder, random_params(decoder), context_bnw, mask_bn)
  greedy_bl = greedy(decoder, params, context_bnw, mask_bn, max_len=MAX_LEN)
  assert greedy_bl[row, step] == EOS and EOS not in greedy_bl[row, :step]
  assert np.all(greedy_bl[row, step + 1:] == PAD)
  assert_pad_after_eos(greedy_bl)
  beam_bl, _ = beam_search(decoder, params, context_bnw, mask_bn, max_len=MAX_LEN,
                                       beam_size=3)
  assert np.any(beam_bl == EOS)
  assert_pad_after_eos(beam_bl)


# ----------------------------------------------------------------------------- beam search


def test_beam_of_one_is_greedy():
  decoder = make_decoder()
  context_bnw, mask_bn = make_context(3, batch=4)
  for p in (random_params(decoder, 3),
            ending_part_way(decoder, random_params(decoder, 3), context_bnw, mask_bn)[0]):
    tokens_bl, score_b = beam_search(decoder, p, context_bnw, mask_bn,
                                                 max_len=MAX_LEN, beam_size=1, length_penalty=0.0)
    np.testing.assert_array_equal(
        tokens_bl, greedy(decoder, p, context_bnw, mask_bn, max_len=MAX_LEN))
    assert score_b.shape == (4,) and score_b.dtype == jnp.float32


def all_sequences(vocab_size, max_len):
  """Every candidate beam search weighs: EOS after 0..max_len-1 other tokens, or max_len
  tokens without EOS; as [S, max_len] padded tokens and their lengths [S]."""
  others = [v for v in range(vocab_size) if v != EOS]
  seqs = [p + (EOS,) for n in range(max_len) for p in itertools.product(others, repeat=n)]
  seqs += list(itertools.product(others, repeat=max_len))
  tokens = np.array([s + (PAD,) * (max_len - len(s)) for s in seqs], np.int32)
  return tokens, np.array([len(s) for s in seqs])


@pytest.mark.parametrize('alpha', [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_brute_force_best(alpha):
  vocab, max_len = 5, 3
  decoder = make_decoder(vocab_size=vocab, max_len=max_len)
  params = random_params(decoder, 4)
  context_bnw, mask_bn = make_context(4)
  tokens_sl, length_s = all_sequences(vocab, max_len)
  num = len(tokens_sl)   # 21 ending in EOS + 64 cut off
  # Score every sequence for every example with the uncached decoder in one batch.
  logits_xlv = teacher_forced(decoder, params, jnp.tile(tokens_sl, (B, 1)),
                              jnp.repeat(context_bnw, num, 0), jnp.repeat(mask_bn, num, 0))
  logp_xl = jnp.take_along_axis(jax.nn.log_softmax(logits_xlv),
                                jnp.tile(tokens_sl, (B, 1))[..., None], axis=-1)[..., 0]
  logp_bs = jnp.sum(logp_xl * (np.arange(max_len) < np.tile(length_s, B)[:, None]), axis=1)
  score_bs = logp_bs.reshape(B, num) / decoder_lib.brevity_penalty(length_s, alpha)
  best_b = jnp.argmax(score_bs, axis=1)

  # Exact once every expansion ranks among the K best: 4 * 4 live beams * 5 tokens.
  tokens_bl, found_b = beam_search(decoder, params, context_bnw, mask_bn,
                                               max_len=max_len, beam_size=80, length_penalty=alpha)
  np.testing.assert_array_equal(tokens_bl, tokens_sl[best_b])
  np.testing.assert_allclose(found_b, jnp.max(score_bs, axis=1), rtol=1e-5)
  # A narrow beam never beats the exhaustive search.
  _, narrow_b = beam_search(decoder, params, context_bnw, mask_bn, max_len=max_len,
                                        beam_size=2, length_penalty=alpha)
  assert np.all(narrow_b <= found_b + 1e-5)


def test_jit_over_a_closure_and_eager():
  """The evaluators jit a closure over the decoder; un-jitted calls give the same."""
  decoder = make_decoder()
  params = random_params(decoder, 5)
  context_bnw, mask_bn = make_context(5)
  for fn, kw in ((decoder_lib.greedy_decode, {}), (decoder_lib.beam_search, {'beam_size': 3})):
    run = functools.partial(fn, decoder, max_len=MAX_LEN, **kw)
    jax.tree.map(np.testing.assert_array_equal, jax.jit(run)(params, context_bnw, mask_bn),
                 run(params, context_bnw, mask_bn))
