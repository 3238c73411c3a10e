"""encoder.Encoder with `pool_at`: the pooled token computed apart in the last block must be the
token the full stack computes there (values and gradients), and a loss that reads only it must
leave the other tokens' work in that block out of the compiled step (XLA's FLOP count)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion.models import layers
from mmfusion.models.attention import take_tokens
from mmfusion.models.encoder import Encoder

B, L, W, M, H = 3, 7, 16, 48, 2
STACK = layers.StackOptions(width=W, depth=2, mlp_dim=M, num_heads=H)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, L, W)), jnp.float32)
  lengths = np.array([7, 4, 1])
  mask_bl = np.arange(L)[None] < lengths[:, None]
  return x, jnp.asarray(mask_bl)[:, None, None, :], jnp.asarray(lengths - 1, jnp.int32)


def _reference(encoder, variables, x, mask, pool_at):
  """The pooled token read off the whole stack's output (no pool_at), as towers did before."""
  tokens = encoder.apply(variables, x, mask)
  return tokens, take_tokens(tokens, pool_at)[:, 0]


@pytest.mark.parametrize('causal,masked', [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize('depth', [1, 2])
def test_the_pooled_token_apart_is_the_stacks_token_in_value_and_gradient(causal, masked, depth):
  encoder = Encoder(STACK.replace(depth=depth), causal=causal)
  x, mask, pool_at = _inputs()
  mask = mask if masked else None
  variables = encoder.init(jax.random.key(0), x, mask)
  tokens, pooled = encoder.apply(variables, x, mask, True, pool_at)
  ref_tokens, ref_pooled = _reference(encoder, variables, x, mask, pool_at)
  np.testing.assert_allclose(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)

  # A pooled-only loss: the gradient w.r.t. every param and the input, against the reference.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, W)), jnp.float32)

  def loss_apart(params, x):
    return jnp.sum(encoder.apply({'params': params}, x, mask, True, pool_at)[1] * weights)

  def loss_reference(params, x):
    return jnp.sum(_reference(encoder, {'params': params}, x, mask, pool_at)[1] * weights)

  got = jax.grad(loss_apart, argnums=(0, 1))(variables['params'], x)
  want = jax.grad(loss_reference, argnums=(0, 1))(variables['params'], x)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


def test_a_query_with_no_key_pools_to_what_the_stack_gives_it():
  # Non-causal, example 2 pooled at a padded position whose keys are all masked... and an
  # example whose every key is padding: both sides give the attention output exactly zero.
  encoder = Encoder(STACK.replace(depth=1), causal=False)
  x, _, _ = _inputs()
  mask = jnp.asarray(np.array([[1, 1, 0, 0, 0, 0, 0], [0] * 7, [1] * 7], bool))[:, None, None, :]
  pool_at = jnp.asarray([5, 3, 0], jnp.int32)
  variables = encoder.init(jax.random.key(0), x, mask)
  _, pooled = encoder.apply(variables, x, mask, True, pool_at)
  _, ref_pooled = _reference(encoder, variables, x, mask, pool_at)
  assert np.all(np.isfinite(pooled))
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('changes,train', [(dict(scan_layers=True), False),
                                           (dict(attention_impl='explicit', sow_weights=True), False),
                                           (dict(dropout=0.1), True)])
def test_scan_recorded_weights_and_dropout_read_the_pooled_token_off_the_tokens(changes, train):
  encoder = Encoder(STACK.replace(**changes), causal=True)
  x, mask, pool_at = _inputs()
  variables = encoder.init(jax.random.key(0), x, mask)
  (tokens, pooled), _ = encoder.apply(variables, x, mask, not train, pool_at,
                                      rngs={'dropout': jax.random.key(1)},
                                      mutable=['intermediates'])
  np.testing.assert_array_equal(pooled, take_tokens(tokens, pool_at)[:, 0])


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']


def test_a_loss_reading_only_the_pooled_token_skips_the_other_tokens_in_the_last_block():
  b, length, w, m = 2, 16, 64, 256    # wide enough that the matmuls dominate
  encoder = Encoder(layers.StackOptions(width=w, depth=1, mlp_dim=m, num_heads=2),
                           causal=True)
  x = jnp.ones((b, length, w), jnp.float32)
  mask = jnp.ones((b, 1, 1, length), bool)
  pool_at = jnp.asarray([length - 1, 3], jnp.int32)
  params = encoder.init(jax.random.key(0), x, mask)['params']

  def gradient(read):
    def loss(p):
      return jnp.sum(read(encoder.apply({'params': p}, x, mask, True, pool_at)))
    return lambda params, x: jax.grad(loss)(params)

  # Matmul FLOPs of the block's forward pass by hand (with the gradient w.r.t. the params:
  # x 3): every token's queries, keys, values, out projection and MLP (4 W^2 + 2 W M MACs)
  # and attention (2 L W); with the pooled token alone, every token's keys and values (2 W^2)
  # and the rest for one token.
  full = 2 * b * (length * (4 * w * w + 2 * w * m) + 2 * length * length * w)
  apart = 2 * b * (length * 2 * w * w + (2 * w * w + 2 * w * m) + 2 * length * w)
  # Beyond the matmuls: layer norms, softmax and GELU (a few per cent).
  assert _flops(gradient(lambda out: out[0]), params, x) == pytest.approx(3 * full, rel=0.08)
  assert _flops(gradient(lambda out: out[1]), params, x) == pytest.approx(3 * apart, rel=0.08)
  assert apart < 0.25 * full
