"""Caption decoder (CoCa-style): causal self-attention over the text so far, cross-attention to
another tower's tokens, and a projection to the vocabulary; greedy and beam-search decoding that
run one token per step against a key/value cache, inside a single `jax.lax.while_loop`.

Decoding in brief:
  cache = init_cache(decoder, params, B, context_bnw, context_mask_bn)   # index 0, empty
  logits_b1v, cache = step(tokens_b1, cache)   # decoder.apply(..., decode=True, mutable='cache')
`decode_uncached` is the slow reference that re-runs the whole prefix at every step.
(~400 lines: the decoder and the decoding loops that must agree with it, side by side.)
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers
from mmfusion.models.attention import MultiHeadAttention, explicit_attention
from mmfusion.vocab import BOS_ID, EOS_ID, PAD_ID

Array = jax.Array
Params = Any
# Log-probability of an impossible beam. Finite, so sums and length normalisation never make
# inf - inf = NaN; any real log-prob of a short caption is many orders of magnitude above it.
NEG_INF = -1.0e9
# Names of the cross-attention cache entries: the projected context is the same for every beam
# of an example, so beam search never reorders them.
CONTEXT_CACHE = ('context_key', 'context_value')


class StepAttention(nn.Module):
  """One decoding step of attention.MultiHeadAttention, against a key/value cache.

  It declares exactly MultiHeadAttention's params (query, key without bias, value, out), so a
  decoder trained with MultiHeadAttention decodes with this module under the same name.

  Self-attention (`context_bnw` not given, `max_len` set): the step's key and value are
  written into 'cache' cached_key / cached_value [B, max_len, heads, kv] at `index`, and the
  query attends to positions 0..index.
  Cross-attention (`cross=True`): the context's keys and values are projected once, when the
  cache is created, into context_key / context_value [B, N, heads, kv]; later steps read them
  and need no context (pass None), so a step costs O(N) instead of O(N * width^2).

  Following flax's convention, the call that creates the cache does not update it: it returns
  the output of a first step at position 0 and leaves the cache empty (index 0).
  """
  stack: layers.StackOptions
  max_len: int = 0
  cross: bool = False

  @nn.compact
  def __call__(self, x_b1w: Array, index: Array, context_bnw: Array | None = None,
               context_mask_bn: Array | None = None) -> Array:
    batch, _, width = x_b1w.shape
    num_heads, dtypes = self.stack.num_heads, dict(dtype=self.stack.dtype,
                                                   param_dtype=self.stack.param_dtype)
    head_dim = width // num_heads
    project_in = lambda name, use_bias=True: layers.HeadsDense(
        kernel_shape=(width, num_heads, head_dim), kernel_axes=('embed', 'heads', 'kv'),
        in_dims=1, use_bias=use_bias, **dtypes, name=name)
    query, key, value = project_in('query'), project_in('key', False), project_in('value')
    bqhd = ('batch', 'length', 'heads', 'kv')
    q_b1hd = layers.constrain(query(x_b1w), bqhd)

    if self.cross:
      k_bnhd, v_bnhd = self._context_kv(key, value, context_bnw)
      mask = None if context_mask_bn is None else context_mask_bn[:, None, None, :]
      out_b1hd = explicit_attention(q_b1hd, k_bnhd, v_bnhd, mask)[0]
    else:
      k_b1hd = layers.constrain(key(x_b1w), bqhd)
      v_b1hd = layers.constrain(value(x_b1w), bqhd)
      is_initialized = self.has_variable('cache', 'cached_key')
      shape = (batch, self.max_len, num_heads, head_dim)
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, shape, self.stack.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, shape, self.stack.dtype)
      if is_initialized:
        write = lambda cache, x: jax.lax.dynamic_update_slice_in_dim(cache, x, index, axis=1)
        cached_key.value = write(cached_key.value, k_b1hd)
        cached_value.value = write(cached_value.value, v_b1hd)
        k_blhd = layers.constrain(cached_key.value, bqhd)
        v_blhd = layers.constrain(cached_value.value, bqhd)
        # The causal mask of a single query: positions written so far, this one included.
        mask_111l = (jnp.arange(self.max_len) <= index)[None, None, None, :]
        out_b1hd = explicit_attention(q_b1hd, k_blhd, v_blhd, mask_111l)[0]
      else:
        out_b1hd = explicit_attention(q_b1hd, k_b1hd, v_b1hd, None)[0]   # the cache's first step

    out_b1w = layers.HeadsDense(
        kernel_shape=(num_heads, head_dim, width), kernel_axes=('heads', 'kv', 'embed'),
        in_dims=2, **dtypes, name='out')(layers.constrain(out_b1hd, bqhd))
    return layers.constrain(out_b1w, ('batch', 'length', 'embed'))

  def _context_kv(self, key: nn.Module, value: nn.Module,
                  context_bnw: Array | None) -> tuple[Array, Array]:
    if not self.has_variable('cache', CONTEXT_CACHE[0]):
      if context_bnw is None:
        raise ValueError('creating the decode cache needs the context (later steps do not)')
      k_bnhd, v_bnhd = key(context_bnw), value(context_bnw)
    context_key = self.variable('cache', CONTEXT_CACHE[0], lambda: k_bnhd)
    context_value = self.variable('cache', CONTEXT_CACHE[1], lambda: v_bnhd)
    bnhd = ('batch', 'length', 'heads', 'kv')
    return (layers.constrain(context_key.value, bnhd),
            layers.constrain(context_value.value, bnhd))


class DecoderBlock(nn.Module):
  """Pre-LN: x + self_attn(LN(x)) (causal), x + cross_attn(LN(x), context), x + mlp(LN(x)).

  On whole sequences both attentions are attention.MultiHeadAttention; with `decode` they are
  StepAttention over the same params.
  """
  stack: layers.StackOptions
  max_len: int

  @nn.compact
  def __call__(self, x_blw: Array, context_bnw: Array | None, context_mask_bn: Array | None, *,
               deterministic: bool = True, decode: bool = False,
               index: Array | None = None) -> Array:
    stack = self.stack
    ln = functools.partial(layers.stack_norm, stack)
    drop = lambda y: nn.Dropout(stack.dropout)(y, deterministic)
    x_blw = layers.constrain(x_blw, ('batch', 'length', 'embed'))

    y = ln('ln_self')(x_blw)
    if decode:
      y = StepAttention(stack, max_len=self.max_len, name='self_attn')(y, index)
    else:
      y = MultiHeadAttention(stack, causal=True, name='self_attn')(y)
    x_blw = x_blw + drop(y)

    y = ln('ln_cross')(x_blw)
    if decode:
      y = StepAttention(stack, cross=True, name='cross_attn')(y, index, context_bnw,
                                                              context_mask_bn)
    else:
      mask = None if context_mask_bn is None else context_mask_bn[:, None, None, :]
      y = MultiHeadAttention(stack, name='cross_attn')(y, context_bnw, mask=mask)
    x_blw = x_blw + drop(y)

    y = ln('ln_mlp')(x_blw)
    y = layers.MlpBlock(stack, name='mlp')(y, deterministic)
    x_blw = x_blw + drop(y)
    return layers.constrain(x_blw, ('batch', 'length', 'embed'))


class TextDecoder(nn.Module):
  """Autoregressive text decoder cross-attending to a context (e.g. image tokens).

  `__call__(inputs_bl, context_bnw, context_mask_bn, train=False, decode=False)` returns
  logits_blv float32: the next-token logits at every position. inputs start with BOS (teacher
  forcing: BOS + target[:-1]); L <= max_len. The context [B, N, Wc], of any width, is
  projected to `width` ('context_proj'); context_mask [B, N] bool is True where a context token
  may be attended to (None: all). Self-attention is causal, so a token's logits never depend on
  later inputs, and padding after EOS needs no mask.

  decode=True runs one step: L must be 1, and the 'cache' collection (see `init_cache`) is
  read and updated: cache_index (the step's position) and, per block, the self-attention's
  cached_key / cached_value [B, max_len, heads, kv] and the cross-attention's context_key /
  context_value [B, N, heads, kv], projected once when the cache is created. After that the
  context is not read (pass None); context_mask_bn still is. Steps past max_len are not
  caught under jit (the position would clamp): the decoding functions check their max_len.

  Params: token_embedding [vocab, W], pos_embedding [max_len, W], context_proj, block_{i}
  (ln_self, self_attn, ln_cross, cross_attn, ln_mlp, mlp), decoder_norm, logits [W, vocab].
  """
  vocab_size: int
  max_len: int
  stack: layers.StackOptions

  def __post_init__(self):
    if self.vocab_size < 2 or self.max_len < 1:
      raise ValueError(f'TextDecoder needs vocab_size >= 2 and max_len >= 1; got '
                       f'{self.vocab_size}, {self.max_len}')
    super().__post_init__()

  @property
  def width(self) -> int:
    return self.stack.width

  @nn.compact
  def __call__(self, inputs_bl: Array, context_bnw: Array | None,
               context_mask_bn: Array | None, *, train: bool = False,
               decode: bool = False) -> Array:
    length = inputs_bl.shape[1]
    if decode and length != 1:
      raise ValueError(f'decode=True runs one token per step; got inputs of length {length}')
    if length > self.max_len:
      raise ValueError(f'inputs of length {length} > the decoder max_len {self.max_len}')
    stack = self.stack
    x_blw = nn.Embed(
        self.vocab_size, stack.width, dtype=stack.dtype, param_dtype=stack.param_dtype,
        embedding_init=layers.named_init(nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
        name='token_embedding')(inputs_bl)
    pos_init = layers.named_init(nn.initializers.normal(stddev=0.02), ('length', 'embed'))
    pos_lw = self.param('pos_embedding', pos_init, (self.max_len, stack.width), stack.param_dtype)

    index = None
    if decode:
      has_cache = self.has_variable('cache', 'cache_index')
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
      index = cache_index.value
      if has_cache:
        cache_index.value = index + 1
        context_bnw = None   # the blocks read its keys and values from the cache
      pos_lw = jax.lax.dynamic_slice_in_dim(pos_lw, index, 1)
    x_blw = x_blw + pos_lw[:length].astype(stack.dtype)[None]
    x_blw = layers.constrain(x_blw, ('batch', 'length', 'embed'))
    x_blw = nn.Dropout(stack.dropout)(x_blw, not train)

    if context_bnw is not None:
      # Input dim unnamed: it is another tower's width, and 'embed' may appear only once.
      context_bnw = nn.Dense(
          stack.width, dtype=stack.dtype, param_dtype=stack.param_dtype,
          kernel_init=layers.named_init(nn.initializers.lecun_normal(), (None, 'embed')),
          bias_init=layers.named_init(nn.initializers.zeros, ('embed',)), name='context_proj')(
              context_bnw)
      context_bnw = layers.constrain(context_bnw, ('batch', 'length', 'embed'))
    elif not decode:
      raise ValueError('TextDecoder needs a context (None only on decode steps)')
    if context_mask_bn is not None:
      context_mask_bn = context_mask_bn.astype(jnp.bool_)

    for i in range(stack.depth):
      x_blw = DecoderBlock(stack, max_len=self.max_len, name=f'block_{i}')(
          x_blw, context_bnw, context_mask_bn, deterministic=not train, decode=decode,
          index=index)
    x_blw = layers.stack_norm(stack, 'decoder_norm')(x_blw)
    logits_blv = nn.Dense(
        self.vocab_size, dtype=stack.dtype, param_dtype=stack.param_dtype,
        kernel_init=layers.named_init(nn.initializers.xavier_uniform(), ('embed', 'vocab')),
        bias_init=layers.named_init(nn.initializers.zeros, ('vocab',)), name='logits')(x_blw)
    return layers.constrain(logits_blv.astype(jnp.float32), ('batch', 'length', 'vocab'))


# ------------------------------------------------------------------------------- decoding


def init_cache(decoder: TextDecoder, params: Params, batch_size: int, context_bnw: Array,
               context_mask_bn: Array | None) -> dict[str, Any]:
  """An empty decode cache (index 0, zero self-attention keys/values) for `batch_size` rows,
  with the context's cross-attention keys/values already projected by `params`."""
  if context_bnw.shape[0] != batch_size:
    raise ValueError(f'context has {context_bnw.shape[0]} rows, batch_size is {batch_size}')
  tokens_b1 = jnp.full((batch_size, 1), BOS_ID, jnp.int32)
  _, variables = decoder.apply({'params': params}, tokens_b1, context_bnw, context_mask_bn,
                               decode=True, mutable=['cache'])
  return variables['cache']


def _step(decoder: TextDecoder, params: Params, tokens_b: Array, cache: Any,
          context_mask_bn: Array | None) -> tuple[Array, Any]:
  """Next-token logits [B, V] after `tokens_b` [B], and the cache one position further."""
  logits_b1v, variables = decoder.apply(
      {'params': params, 'cache': cache}, tokens_b[:, None], None, context_mask_bn,
      decode=True, mutable=['cache'])
  return logits_b1v[:, 0], variables['cache']


def _check_max_len(decoder: TextDecoder, max_len: int) -> None:
  # Writing max_len tokens feeds BOS and the first max_len - 1 of them: max_len positions.
  if not 1 <= max_len <= decoder.max_len:
    raise ValueError(f'max_len={max_len}: must be in [1, decoder.max_len={decoder.max_len}]')


def greedy_decode(decoder: TextDecoder, params: Params, context_bnw: Array,
                  context_mask_bn: Array | None, *, max_len: int, bos_id: int = BOS_ID,
                  eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Array:
  """The argmax token at every step, with the cache: tokens [B, max_len] int32, BOS left out,
  EOS kept, pad_id after it. One while_loop, which stops once every row has written EOS."""
  _check_max_len(decoder, max_len)
  batch = context_bnw.shape[0]
  cache = init_cache(decoder, params, batch, context_bnw, context_mask_bn)

  def not_done(state):
    i, _, _, done_b, _ = state
    return (i < max_len) & ~jnp.all(done_b)

  def write_one(state):
    i, token_b, out_bl, done_b, cache = state
    logits_bv, cache = _step(decoder, params, token_b, cache, context_mask_bn)
    token_b = jnp.where(done_b, pad_id, jnp.argmax(logits_bv, axis=-1).astype(jnp.int32))
    out_bl = out_bl.at[:, i].set(token_b)
    return i + 1, token_b, out_bl, done_b | (token_b == eos_id), cache

  state = (jnp.zeros((), jnp.int32), jnp.full((batch,), bos_id, jnp.int32),
           jnp.full((batch, max_len), pad_id, jnp.int32), jnp.zeros((batch,), jnp.bool_), cache)
  return jax.lax.while_loop(not_done, write_one, state)[2]


def decode_uncached(decoder: TextDecoder, params: Params, context_bnw: Array,
                    context_mask_bn: Array | None, *, max_len: int, bos_id: int = BOS_ID,
                    eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Array:
  """Greedy decoding without a cache, the reference for `greedy_decode`: each step re-runs the
  whole decoder on BOS + the tokens so far and takes the argmax at the last position."""
  _check_max_len(decoder, max_len)
  batch = context_bnw.shape[0]
  inputs_bl = jnp.full((batch, 1), bos_id, jnp.int32)
  done_b = jnp.zeros((batch,), jnp.bool_)
  out = []
  for _ in range(max_len):
    logits_blv = decoder.apply({'params': params}, inputs_bl, context_bnw, context_mask_bn)
    token_b = jnp.where(done_b, pad_id, jnp.argmax(logits_blv[:, -1], axis=-1).astype(jnp.int32))
    out.append(token_b)
    done_b = done_b | (token_b == eos_id)
    inputs_bl = jnp.concatenate([inputs_bl, token_b[:, None]], axis=1)
  return jnp.stack(out, axis=1)


def brevity_penalty(length: Array | int, alpha: float) -> Array:
  """GNMT's length normalisation ((5 + length) / 6) ** alpha; 1 for alpha = 0."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(cache: Any, parent_bk: Array) -> Any:
  """The cache rows (b * K + k) of the beams that survive: row (b, k) <- (b, parent_bk[b, k]).
  The index (a scalar) and the context keys/values (alike across an example's beams) stay."""
  batch, beams = parent_bk.shape
  rows = (jnp.arange(batch)[:, None] * beams + parent_bk).reshape(-1)

  def gather(path, x):
    if x.ndim == 0 or getattr(path[-1], 'key', None) in CONTEXT_CACHE:
      return x
    return x[rows]
  return jax.tree_util.tree_map_with_path(gather, cache)


def beam_search(decoder: TextDecoder, params: Params, context_bnw: Array,
                context_mask_bn: Array | None, *, max_len: int, beam_size: int = 4,
                length_penalty: float = 0.6, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                pad_id: int = PAD_ID) -> tuple[Array, Array]:
  """Beam search with the cache: (tokens [B, max_len] int32, score [B] float32) of the best
  sequence found, BOS left out, pad_id after its EOS.

  score = log p(sequence) / brevity_penalty(length, length_penalty), length counting EOS. The
  candidates are the sequences that end with EOS within max_len tokens and, once max_len is
  reached, those that were cut off there (so the search always returns something, as greedy
  decoding does).

  Each step expands the K live beams by every token and keeps the 2K best expansions, enough
  that K of them do not end in EOS: those K go on as the live beams, and their cache rows
  (tiled to B * K) follow them. An expansion that ends in EOS is set aside as finished only if
  it ranks among the K best (as in Hugging Face's beam scorer; flax's WMT example takes any of
  the 2K): an ending that would not have made the beam does not count, so beam_size=1 with
  length_penalty=0 is exactly greedy decoding. Only the best finished sequence per example is
  kept, since only it is returned, and the loop stops early once no live beam can overtake it:
  a live log-prob only falls, and the penalty is largest at max_len.
  """
  _check_max_len(decoder, max_len)
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1; got {beam_size}')
  if length_penalty < 0:
    # The early stop relies on the penalty growing with length.
    raise ValueError(f'length_penalty must be >= 0; got {length_penalty}')
  batch, beams, vocab = context_bnw.shape[0], beam_size, decoder.vocab_size
  # The context is projected once per example, then its cache rows are repeated per beam.
  cache = init_cache(decoder, params, batch, context_bnw, context_mask_bn)
  cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0) if x.ndim else x, cache)
  mask_xn = None if context_mask_bn is None else jnp.repeat(context_mask_bn, beams, axis=0)
  take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)),
                                            axis=1)

  def searching(state):
    live_bound_b = state['live_logp'][:, 0] / brevity_penalty(max_len, length_penalty)
    return (state['i'] < max_len) & ~jnp.all(live_bound_b < state['best_score'])

  def expand(state):
    i = state['i']
    logits_xv, cache = _step(decoder, params, state['token'].reshape(-1), state['cache'], mask_xn)
    logp_bkv = jax.nn.log_softmax(logits_xv).reshape(batch, beams, vocab)
    logp_bkv = logp_bkv + state['live_logp'][:, :, None]
    # c = the 2K best expansions: enough that K of them do not end in EOS.
    logp_bc, flat_bc = jax.lax.top_k(logp_bkv.reshape(batch, beams * vocab), 2 * beams)
    parent_bc, token_bc = flat_bc // vocab, (flat_bc % vocab).astype(jnp.int32)
    seqs_bcl = take(state['live_seqs'], parent_bc).at[:, :, i].set(token_bc)
    ends_bc = token_bc == eos_id

    # Finished: those among the K best that end with EOS, and at the last step any of the K
    # best. (top_k sorts, so the K best are c < K.)
    finishes_bc = (jnp.arange(2 * beams) < beams) & (ends_bc | (i == max_len - 1))
    score_bc = jnp.where(finishes_bc, logp_bc / brevity_penalty(i + 1, length_penalty), NEG_INF)
    top_b = jnp.argmax(score_bc, axis=1)
    top_score_b = take(score_bc, top_b[:, None])[:, 0]
    better_b = top_score_b > state['best_score']
    best_score = jnp.where(better_b, top_score_b, state['best_score'])
    best_seq = jnp.where(better_b[:, None], take(seqs_bcl, top_b[:, None])[:, 0],
                         state['best_seq'])

    # Live: the K best that go on.
    live_logp_bk, pick_bk = jax.lax.top_k(jnp.where(ends_bc, NEG_INF, logp_bc), beams)
    cache = _gather_beams(cache, take(parent_bc, pick_bk))
    return dict(i=i + 1, token=take(token_bc, pick_bk), live_seqs=take(seqs_bcl, pick_bk),
                live_logp=live_logp_bk, best_seq=best_seq, best_score=best_score, cache=cache)

  state = dict(
      i=jnp.zeros((), jnp.int32),
      token=jnp.full((batch, beams), bos_id, jnp.int32),
      live_seqs=jnp.full((batch, beams, max_len), pad_id, jnp.int32),
      # One live beam to start from; the others are impossible until the first expansion.
      live_logp=jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF)[None].repeat(batch, 0),
      best_seq=jnp.full((batch, max_len), pad_id, jnp.int32),
      best_score=jnp.full((batch,), NEG_INF, jnp.float32),
      cache=cache)
  state = jax.lax.while_loop(searching, expand, state)
  return state['best_seq'], state['best_score']
