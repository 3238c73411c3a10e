"""Text tower: token and position embedding, causal or bidirectional encoder, eos|last|cls|gap
pooling, projection. Registered as tower type 'text'.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers
from mmfusion.models import towers
from mmfusion.models.encoder import Encoder

Array = jax.Array

POOLS = ('eos', 'last', 'cls', 'gap')


def last_true_index(mask_bl: Array) -> Array:
  """Index of the last True per row ([B] int32); 0 for a row with no True."""
  length = mask_bl.shape[1]
  idx_b = length - 1 - jnp.argmax(mask_bl[:, ::-1], axis=1)
  return jnp.where(jnp.any(mask_bl, axis=1), idx_b, 0).astype(jnp.int32)


class TextEncoder(nn.Module):
  """Transformer text tower.

  `__call__(text [B,L] int, text_mask [B,L] bool, train=False)` returns `towers.Encoded`:
  tokens [B,L,W] with mask = text_mask, pooled [B,W], embedding [B,D]. `text_mask` is True for
  real tokens (the tokenizer ends each text with EOS, the last True, and pads with id 0 after
  it); padded keys are never attended to, so pad ids cannot change any real token's output.
  With `causal` each token also sees only earlier ones. tokens line up with `text_mask` (a cls
  token, if any, is dropped); embedding = proj(pooled) is NOT normalised.

  pool: 'eos' = the last real token (the natural summary under causal attention), 'last' =
  position L-1, 'cls' = a learned token prepended (needs causal=False: under causal attention
  a first token sees nothing), 'gap' = mean over real tokens.

  Param names: token_embedding [vocab,W], pos_embedding [L,W], cls (pool='cls'), encoder, proj.
  """
  vocab_size: int
  embed_dim: int
  stack: layers.StackOptions
  causal: bool = True
  pool: str = 'eos'

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r}; the text tower knows {POOLS}')
    if self.pool == 'cls' and self.causal:
      raise ValueError("pool='cls' needs causal=False: a prepended cls token under causal "
                       'attention sees only itself')
    if self.vocab_size <= 0:
      raise ValueError(f'vocab_size must be positive; got {self.vocab_size}')
    super().__post_init__()

  @nn.compact
  def __call__(self, text_bl: Array, text_mask_bl: Array | None = None, *,
               train: bool = False) -> towers.Encoded:
    if text_mask_bl is None:
      raise ValueError('the text tower needs a mask (the batch\'s <modality>_mask: bool [B,L], '
                       'True = real token) next to the token ids')
    if text_mask_bl.shape != text_bl.shape:
      raise ValueError(f'text_mask shape {text_mask_bl.shape} != text shape {text_bl.shape}')
    batch, length = text_bl.shape
    stack = self.stack
    real_bl = text_mask_bl.astype(jnp.bool_)
    key_mask_bl = real_bl  # which positions may be attended to (grows by one with a cls token)

    x_blw = nn.Embed(
        self.vocab_size, stack.width, dtype=stack.dtype, param_dtype=stack.param_dtype,
        embedding_init=layers.named_init(nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
        name='token_embedding')(text_bl)
    pos_init = layers.named_init(nn.initializers.normal(stddev=0.02), ('length', 'embed'))
    pos_lw = self.param('pos_embedding', pos_init, (length, stack.width), stack.param_dtype)
    x_blw = layers.constrain(x_blw + pos_lw.astype(stack.dtype)[None], ('batch', 'length', 'embed'))
    x_blw = towers.adversarial_hook(self, x_blw)

    if self.pool == 'cls':
      cls_11w = self.param('cls', layers.named_init(nn.initializers.zeros, (None, None, 'embed')),
                           (1, 1, stack.width), stack.param_dtype)
      x_blw = jnp.concatenate([jnp.tile(cls_11w.astype(stack.dtype), (batch, 1, 1)), x_blw], axis=1)
      key_mask_bl = jnp.concatenate([jnp.ones((batch, 1), jnp.bool_), key_mask_bl], axis=1)

    x_blw = nn.Dropout(stack.dropout)(x_blw, not train)
    # Key-padding mask [B,1,1,L]; the causal triangle is added inside the attention.
    encoder = Encoder(stack, causal=self.causal, name='encoder')
    key_mask_b11l = key_mask_bl[:, None, None, :]
    if self.pool == 'gap':  # mean over real tokens; an all-padding row pools to zeros, not NaN.
      x_blw = encoder(x_blw, key_mask_b11l, not train)
      weights_bl1 = real_bl.astype(jnp.float32)[:, :, None]
      count_b1 = jnp.maximum(jnp.sum(weights_bl1, axis=1), 1.0)
      pooled_bw = (jnp.sum(x_blw.astype(jnp.float32) * weights_bl1, axis=1) / count_b1).astype(
          stack.dtype)
    else:
      # The pooled token comes out of the encoder on its own (computed apart in the last
      # block, which a loss reading only the pooled vector then skips for the other tokens).
      pool_at_b = {'cls': jnp.zeros((batch,), jnp.int32),
                   'eos': last_true_index(real_bl),
                   'last': jnp.full((batch,), length - 1, jnp.int32)}[self.pool]
      x_blw, pooled_bw = encoder(x_blw, key_mask_b11l, not train, pool_at_b)
      if self.pool == 'cls':
        x_blw = x_blw[:, 1:]

    embedding_bd = towers.projection(self.embed_dim, stack)(pooled_bw)
    return towers.Encoded(tokens=x_blw, mask=real_bl, pooled=pooled_bw, embedding=embedding_bd)


@towers.register('text', takes_tokens=True, options=dict(
    variant='', width=96, depth=2, mlp_dim=384, num_heads=4, causal=True, pool='eos',
    dropout=0.0, activation='gelu_tanh', norm_eps=1e-6))
def make_text(options: dict, context: towers.BuildContext) -> TextEncoder:
  sizes = layers.decode_variant(options['variant'])
  if 'patch_size' in sizes:
    raise ValueError(f"variant={options['variant']!r}: a text variant takes no '/<patch size>'")
  return TextEncoder(vocab_size=context.vocab_size, embed_dim=context.embed_dim,
                     causal=options['causal'], pool=options['pool'],
                     stack=context.stack(options, **sizes))
