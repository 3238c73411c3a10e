"""Tests for mmfusion/models: tower shapes, masking, attention against numpy, the output contract,
logical axis names, dtypes and config decoding. Tiny sizes; runs in well under a minute on CPU.
"""
from __future__ import annotations

import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion import checkpoint as ckpt
from mmfusion import config as config_lib
from mmfusion.models import layers
from mmfusion.models import layout
from mmfusion.models import model as model_lib
from mmfusion.models import text as text_lib
from mmfusion.models import towers
from mmfusion.models import vit
from mmfusion.models.attention import MultiHeadAttention
from mmfusion.models.encoder import Encoder

B, IMG, PATCH, L, VOCAB, D, W = 2, 16, 4, 6, 32, 8, 16
TINY = dict(width=W, depth=1, mlp_dim=32, num_heads=2)
STACK = layers.StackOptions(**TINY)


def tiny_model_config(**changes):
  """config.model from the real schema, shrunk; `changes` are dotted-key overrides (a missing
  last key is added, e.g. 'heads.classification')."""
  c = config_lib.base().model
  c.embed_dim = D
  c.towers.image.update(variant='', patch_size=PATCH, **TINY)
  c.towers.text.update(variant='', **TINY)
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def classes(num_classes, modality='image'):
  """The changes that give the model a classification head."""
  return {'heads.classification': dict(num_classes=num_classes, input=modality)}


def make_batch(seed: int = 0, lengths=(4, 6)):
  rng = np.random.default_rng(seed)
  mask = np.arange(L)[None, :] < np.array(lengths)[:, None]
  text = np.where(mask, rng.integers(1, VOCAB, (B, L)), 0).astype(np.int32)
  return {'image': jnp.asarray(rng.normal(size=(B, IMG, IMG, 3)), jnp.float32),
          'text': jnp.asarray(text), 'text_mask': jnp.asarray(mask)}


def text_tower(causal=True, pool='eos', **stack):
  return text_lib.TextEncoder(vocab_size=VOCAB, embed_dim=D, stack=STACK.replace(**stack),
                              causal=causal, pool=pool)


def params_of(variables):
  return nn.unbox(variables)['params']


# ----------------------------------------------------------------------------- towers


@pytest.mark.parametrize('pool', vit.POOLS)
def test_vit_shapes(pool):
  tower = vit.ViT(embed_dim=D, patch_size=PATCH, stack=STACK, pool=pool)
  image = make_batch()['image']
  variables = tower.init(jax.random.key(0), image)
  encoded = tower.apply(variables, image)
  assert isinstance(encoded, towers.Encoded)
  tokens, mask, pooled, emb = encoded
  assert tokens.shape == (B, (IMG // PATCH) ** 2, W)  # cls token dropped from tokens
  # Every patch is real: the mask is all True and lines up with the tokens.
  assert mask.shape == tokens.shape[:2] and mask.dtype == jnp.bool_ and np.all(mask)
  assert pooled.shape == (B, W)
  assert emb.shape == (B, D)
  assert ('cls' in params_of(variables)) == (pool == 'cls')
  assert ('map_head' in params_of(variables)) == (pool == 'map')


@pytest.mark.parametrize('pool', text_lib.POOLS)
def test_text_shapes(pool):
  tower = text_tower(pool=pool, causal=pool != 'cls')
  batch = make_batch()
  variables = tower.init(jax.random.key(0), batch['text'], batch['text_mask'])
  tokens, mask, pooled, emb = tower.apply(variables, batch['text'], batch['text_mask'])
  assert tokens.shape == (B, L, W)  # aligned with text_mask even with a cls token
  np.testing.assert_array_equal(mask, batch['text_mask'])
  assert pooled.shape == (B, W)
  assert emb.shape == (B, D)


def test_eos_pool_takes_last_real_token():
  tower = text_tower(pool='eos', depth=1)
  batch = make_batch(lengths=(3, 6))
  variables = tower.init(jax.random.key(0), batch['text'], batch['text_mask'])
  tokens, _, pooled, _ = tower.apply(variables, batch['text'], batch['text_mask'])
  # The pooled token is computed apart in the last block (encoder.Encoder): equal up to the
  # order of float32 sums.
  np.testing.assert_allclose(pooled[0], tokens[0, 2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooled[1], tokens[1, 5], rtol=1e-5, atol=1e-6)
  assert list(text_lib.last_true_index(jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 1]], bool))) \
      == [1, 0, 2]


@pytest.mark.parametrize('causal,pool', [(True, 'eos'), (True, 'gap'), (False, 'eos'),
                                         (False, 'gap'), (False, 'cls')])
def test_pad_ids_do_not_change_text_embedding(causal, pool):
  tower = text_tower(causal=causal, pool=pool)
  batch = make_batch(lengths=(3, 5))
  variables = tower.init(jax.random.key(0), batch['text'], batch['text_mask'])
  apply = jax.jit(tower.apply)
  emb = apply(variables, batch['text'], batch['text_mask']).embedding
  garbage = np.random.default_rng(1).integers(1, VOCAB, (B, L))
  text2 = jnp.where(batch['text_mask'], batch['text'], garbage)
  tokens2, _, _, emb2 = apply(variables, text2, batch['text_mask'])
  np.testing.assert_allclose(emb2, emb, atol=1e-6)
  assert np.all(np.isfinite(tokens2))


@pytest.mark.parametrize('causal', [True, False])
def test_causal_later_token_does_not_change_earlier_outputs(causal):
  tower = text_tower(causal=causal, pool='last')
  text = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (B, L)), jnp.int32)
  mask = jnp.ones((B, L), bool)
  variables = tower.init(jax.random.key(0), text, mask)
  tokens = tower.apply(variables, text, mask).tokens
  tokens2 = tower.apply(variables, text.at[:, 3].set((text[:, 3] % (VOCAB - 1)) + 1), mask).tokens
  earlier_same = np.allclose(tokens2[:, :3], tokens[:, :3], atol=1e-6)
  assert earlier_same == causal  # bidirectional attention must see the change
  assert not np.allclose(tokens2[:, 3:], tokens[:, 3:], atol=1e-6)


def test_text_cls_pool_requires_bidirectional():
  with pytest.raises(ValueError, match='causal'):
    text_tower(pool='cls', causal=True)
  with pytest.raises(ValueError, match=r"config\.model\.towers\.text.*causal"):
    model_lib.build(tiny_model_config(**{'towers.text.pool': 'cls', 'towers.text.causal': True}),
                    VOCAB)


# ----------------------------------------------------------------------------- attention


def numpy_attention(params, x_q, x_kv, mask, causal=False):
  """Independent float64 reference: project, softmax over allowed keys, zero for no key."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  project = lambda x, n: np.einsum('bld,dhk->blhk', np.asarray(x, np.float64),
                                   p[n]['kernel']) + p[n].get('bias', 0.0)   # no key bias
  q, k, v = project(x_q, 'query'), project(x_kv, 'key'), project(x_kv, 'value')
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  allowed = np.broadcast_to(np.asarray(mask), logits.shape).copy()
  if causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  row_max = np.max(np.where(allowed, logits, -np.inf), axis=-1, keepdims=True)
  e = np.where(allowed, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0)), 0)
  denom = e.sum(-1, keepdims=True)
  w = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
  out = np.einsum('bhqk,bkhd->bqhd', w, v)
  return np.einsum('bqhd,hdo->bqo', out, p['out']['kernel']) + p['out']['bias'], w


@pytest.mark.parametrize('causal', [False, True])
def test_explicit_attention_matches_numpy_and_xla(causal):
  rng = np.random.default_rng(0)
  lq = 5
  x = jnp.asarray(rng.normal(size=(B, lq, W)), jnp.float32)
  mask = rng.random((B, 1, lq, lq)) < 0.6
  mask[:, :, :, 0] = True  # every query keeps a key (key 0 survives the causal triangle too) ...
  mask[0, 0, 2, :] = False  # ... except this one, which may attend to nothing
  mask = jnp.asarray(mask)

  explicit = MultiHeadAttention(
      STACK.replace(attention_impl='explicit', sow_weights=True), causal=causal)
  variables = explicit.init(jax.random.key(0), x, mask=mask)
  out, state = explicit.apply(variables, x, mask=mask, mutable=['intermediates'])
  (weights,) = state['intermediates']['attention_weights']
  want_out, want_w = numpy_attention(params_of(variables), x, x, mask, causal)

  assert weights.shape == (B, 2, lq, lq)
  masked = ~np.broadcast_to(np.asarray(mask), weights.shape)
  assert np.all(np.asarray(weights)[masked] == 0.0)  # exactly zero, not just small
  assert np.all(np.asarray(weights)[0, :, 2] == 0.0)
  np.testing.assert_allclose(weights, want_w, atol=1e-5)
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  assert np.all(np.isfinite(out))

  xla = MultiHeadAttention(STACK.replace(attention_impl='xla'), causal=causal)
  np.testing.assert_allclose(xla.apply(variables, x, mask=mask), out, atol=1e-5)


@pytest.mark.parametrize('impl', ['explicit', 'xla'])
def test_cross_attention_with_key_padding_mask(impl):
  rng = np.random.default_rng(0)
  x_q = jnp.asarray(rng.normal(size=(B, 3, W)), jnp.float32)
  x_kv = jnp.asarray(rng.normal(size=(B, 7, W)), jnp.float32)
  key_mask_b11k = jnp.asarray(np.arange(7)[None] < np.array([[4], [7]]))[:, None, None, :]
  attn = MultiHeadAttention(STACK.replace(num_heads=4, attention_impl=impl))
  variables = attn.init(jax.random.key(0), x_q, x_kv, key_mask_b11k)
  out = attn.apply(variables, x_q, x_kv, key_mask_b11k)
  assert out.shape == (B, 3, W)
  want, _ = numpy_attention(params_of(variables), x_q, x_kv, key_mask_b11k)
  np.testing.assert_allclose(out, want, atol=1e-5)


# (causal, Lq, Lk, mask shape): the masks the towers and fusion pass: key padding in
# self-attention at odd and even lengths, with and without the causal triangle, key padding in
# cross-attention, a full mask.
MASKED_CALLS = [(False, 7, 7, (B, 1, 1, 7)), (True, 7, 7, (B, 1, 1, 7)), (True, 6, 6, (B, 1, 1, 6)),
                (False, 5, 9, (B, 1, 1, 9)), (False, 5, 5, (B, 2, 5, 5)), (True, 5, 5, (B, 2, 5, 5))]


@pytest.mark.parametrize('causal,len_q,len_k,mask_shape', MASKED_CALLS)
def test_cudnn_operands_change_neither_outputs_nor_gradients(causal, len_q, len_k, mask_shape):
  """What cuDNN is handed for a masked call (the mask broadcast over queries, odd lengths
  grown by a padded query and key) is the same attention: run by XLA's kernel, the first Lq
  outputs and the gradients w.r.t. q, k, v equal the unpadded call's."""
  from mmfusion.models.attention import cudnn_masked_operands
  rng = np.random.default_rng(len_q * 10 + len_k)
  q, k, v = (jnp.asarray(rng.normal(size=(B, n, 2, 4)), jnp.float32)
             for n in (len_q, len_k, len_k))
  mask = rng.random(mask_shape) < 0.7
  mask[..., 0] = True                       # every row keeps a key, so outputs are comparable
  mask = jnp.asarray(mask)
  cot = jnp.asarray(rng.normal(size=(B, len_q, 2, 4)), jnp.float32)

  def plain(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation='xla')

  def prepared(q, k, v):
    *qkv, grown_mask = cudnn_masked_operands(q, k, v, mask)
    assert grown_mask.shape[2:] == (qkv[0].shape[1], qkv[1].shape[1])
    assert qkv[0].shape[1] % 2 == 0 and qkv[1].shape[1] % 2 == 0
    return jax.nn.dot_product_attention(*qkv, mask=grown_mask, is_causal=causal,
                                        implementation='xla')[:, :len_q]

  want, want_vjp = jax.vjp(plain, q, k, v)
  got, got_vjp = jax.vjp(prepared, q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-6)
  for g, w in zip(got_vjp(cot), want_vjp(cot)):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_cudnn_attention_hands_the_kernel_prepared_operands(causal, monkeypatch):
  """MultiHeadAttention with attention_impl='cudnn' and a key-padding mask (text: 7 tokens, the
  second example all padding): the kernel gets even lengths and a mask over every query, and
  the module's output is the 'xla' one. cuDNN cannot run here, so XLA's kernel stands in for it,
  behind jax's function, recording what it is handed."""
  handed = []
  fused = jax.nn.dot_product_attention

  def kernel(q, k, v, *, mask, is_causal, implementation):
    handed.append((implementation, q.shape, k.shape, None if mask is None else mask.shape))
    return fused(q, k, v, mask=mask, is_causal=is_causal, implementation='xla')

  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(B, 7, W)), jnp.float32)
  key_mask = jnp.asarray(np.arange(7)[None] < np.array([[4], [0]]))[:, None, None, :]
  xla = MultiHeadAttention(STACK.replace(attention_impl='xla'), causal=causal)
  variables = xla.init(jax.random.key(0), x, mask=key_mask)
  want = xla.apply(variables, x, mask=key_mask)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', kernel)
  got = MultiHeadAttention(STACK.replace(attention_impl='cudnn'), causal=causal).apply(
      variables, x, mask=key_mask)
  assert handed == [('cudnn', (B, 8, 2, 8), (B, 8, 2, 8), (B, 1, 8, 8))]
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.all(np.isfinite(got))


def test_sow_requires_explicit_attention():
  # The stack options refuse it, before any module is built.
  with pytest.raises(ValueError, match='explicit'):
    layers.StackOptions(**TINY, sow_weights=True)


def test_build_with_sow_attention_collects_weights():
  model = model_lib.build(tiny_model_config(), VOCAB, sow_attention=True)
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch)
  _, state = model.apply(variables, batch, mutable=['intermediates'])
  w = state['intermediates']['text']['encoder']['block_0']['attn']['attention_weights'][0]
  assert w.shape == (B, TINY['num_heads'], L, L)


def test_remat_keeps_params_and_outputs():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 4, W)), jnp.float32)
  plain = Encoder(STACK.replace(depth=2))
  remat = Encoder(STACK.replace(depth=2, remat='full'))
  variables = plain.init(jax.random.key(0), x)
  assert (jax.tree_util.tree_structure(jax.eval_shape(remat.init, jax.random.key(0), x))
          == jax.tree_util.tree_structure(variables))
  # One jit for both (a compile costs more than this tiny model's compute).
  both = jax.jit(lambda v: [jax.value_and_grad(lambda v: jnp.sum(m.apply(v, x) ** 2))(v)
                            for m in (plain, remat)])
  (loss_plain, g_plain), (loss_remat, g_remat) = both(variables)
  np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         nn.unbox(g_plain), nn.unbox(g_remat))


# ----------------------------------------------------------------------------- MultimodalModel


def test_model_outputs_and_param_names():
  model = model_lib.build(tiny_model_config(), VOCAB)
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch)
  assert set(params_of(variables)) == {'image', 'text', 'logit_scale', 'logit_bias'}
  out = jax.jit(model.apply)(variables, batch)
  for m in ('image', 'text'):
    emb = out['embeddings'][m]
    assert emb.shape == (B, D) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    assert out['pooled'][m].shape == (B, W)
  assert out['tokens']['image'].shape == (B, (IMG // PATCH) ** 2, W)
  assert out['tokens']['text'].shape == (B, L, W)
  assert out['logit_scale'].shape == () and out['logit_scale'].dtype == jnp.float32
  np.testing.assert_allclose(out['logit_scale'], 1 / 0.07, rtol=1e-5)
  np.testing.assert_array_equal(out['masks']['text'], batch['text_mask'])
  assert out['masks']['image'].shape == (B, (IMG // PATCH) ** 2) and np.all(out['masks']['image'])
  assert 'classification' not in out   # no head configured, no head output


def test_absent_modality_gives_absent_keys():
  model = model_lib.build(tiny_model_config(**classes(3)), VOCAB)
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch)
  image_only = model.apply(variables, {'image': batch['image']})
  text_only = model.apply(variables, {'text': batch['text'], 'text_mask': batch['text_mask']})
  for out, present in ((image_only, 'image'), (text_only, 'text')):
    for key in ('embeddings', 'tokens', 'pooled', 'masks'):
      assert set(out[key]) == {present}
  # The head reads the image.
  assert 'classification' in image_only and 'classification' not in text_only
  # A tower run alone gives the same embedding as when run with the other modality.
  both = model.apply(variables, batch)
  np.testing.assert_allclose(text_only['embeddings']['text'], both['embeddings']['text'],
                             atol=1e-6)
  with pytest.raises(ValueError, match='text tower needs a mask'):
    model.apply(variables, {'text': batch['text']})


@pytest.mark.parametrize('head_input', ['image', 'text'])
def test_head_only_with_classes(head_input):
  batch = make_batch()
  model = model_lib.build(tiny_model_config(**classes(3, head_input)), VOCAB)
  variables = model.init(jax.random.key(0), batch)
  params = params_of(variables)
  assert set(params) == {'image', 'text', 'logit_scale', 'logit_bias', 'classification'}
  assert set(params['classification']) == {'dense'}
  assert params['classification']['dense']['kernel'].shape == (W, 3)
  # Give the zero-init head weights so the test can tell which pooled vector it reads.
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(W, 3)), jnp.float32)
  dense = {'kernel': kernel, 'bias': jnp.zeros(3)}
  variables = {'params': {**params, 'classification': {'dense': dense}}}
  out = model.apply(variables, batch)
  logits = out['classification']['logits']
  assert logits.shape == (B, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, out['pooled'][head_input] @ kernel, atol=1e-5)


def test_logit_scale_clamp_and_gradient():
  model = model_lib.build(tiny_model_config(), VOCAB)
  batch = {'image': make_batch()['image']}
  params = params_of(model.init(jax.random.key(0), batch))

  def scale_and_grad(p_value):
    def f(p):
      return model.apply({'params': {**params, 'logit_scale': p}}, batch)['logit_scale']
    return f(p_value), jax.grad(f)(p_value)

  scale, grad = scale_and_grad(jnp.log(1000.0))
  assert float(scale) == 100.0 and float(grad) == 0.0
  scale, grad = scale_and_grad(params['logit_scale'])  # log(1/0.07): below the clamp
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  np.testing.assert_allclose(grad, 1 / 0.07, rtol=1e-5)  # d exp(p) / dp = exp(p)


def test_siglip_init_values():
  model = model_lib.build(tiny_model_config(temperature_init=10.0, bias_init=-10.0), VOCAB)
  batch = {'image': make_batch()['image']}
  out = model.apply(model.init(jax.random.key(0), batch), batch)
  np.testing.assert_allclose(out['logit_scale'], 10.0, rtol=1e-5)
  assert float(out['logit_bias']) == -10.0


def test_bf16_compute_with_f32_params():
  changes = {'towers.image.pool': 'map'}
  model = model_lib.build(tiny_model_config(dtype='bfloat16', **changes), VOCAB)
  batch = make_batch()
  abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params_of(abstract))} \
      == {jnp.dtype(jnp.float32)}
  # The compute dtype does not change the params, so a float32 model's init serves (and is
  # cheaper to run here than a second, bfloat16 init).
  variables = model_lib.build(tiny_model_config(**changes), VOCAB).init(jax.random.key(0), batch)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract)
  out = jax.jit(model.apply)(variables, batch)
  assert out['tokens']['image'].dtype == jnp.bfloat16
  assert out['tokens']['text'].dtype == jnp.bfloat16
  for m in ('image', 'text'):
    assert out['embeddings'][m].dtype == jnp.float32
    assert np.all(np.isfinite(out['embeddings'][m]))
    np.testing.assert_allclose(np.linalg.norm(out['embeddings'][m], axis=-1), 1.0, atol=1e-5)


def test_dropout_only_when_training():
  model = model_lib.build(tiny_model_config(**{'towers.image.dropout': 0.5}), VOCAB)
  batch = {'image': make_batch()['image']}
  variables = model.init(jax.random.key(0), batch)
  eval1 = model.apply(variables, batch)['embeddings']['image']
  eval2 = model.apply(variables, batch, train=False)['embeddings']['image']
  train = model.apply(variables, batch, train=True,
                      rngs={'dropout': jax.random.key(1)})['embeddings']['image']
  np.testing.assert_array_equal(eval1, eval2)
  assert not np.allclose(train, eval1, atol=1e-4)


# ----------------------------------------------------------------------------- axes and config


@pytest.mark.parametrize('changes', [
    {'towers.image.pool': 'map', 'towers.text.pool': 'cls', 'towers.text.causal': False,
     **classes(4)},
    {'towers.image.pool': 'cls', 'towers.text.pool': 'eos', 'param_dtype': 'bfloat16'},
])
def test_every_param_has_logical_axis_names(changes):
  model = model_lib.build(tiny_model_config(**changes), VOCAB)
  # Abstract init (no compute): the boxes carry the names, the ShapeDtypeStructs the shapes.
  boxed = jax.eval_shape(model.init, jax.random.key(0), make_batch())['params']
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(boxed), is_leaf=is_spec)
  values = jax.tree_util.tree_leaves(nn.unbox(boxed))
  assert len(specs) == len(values)
  for (path, spec), value in zip(specs, values):
    name = jax.tree_util.keystr(path)
    assert is_spec(spec), f'{name} has no logical axis names'
    assert len(spec) == value.ndim, f'{name}: {spec} for shape {value.shape}'
    assert set(spec) <= set(layers.LOGICAL_AXES) | {None}, f'{name}: {spec}'
    named = [a for a in spec if a is not None]
    assert len(named) == len(set(named)), f'{name} repeats a logical axis: {spec}'
    if changes.get('param_dtype') == 'bfloat16':
      assert value.dtype == jnp.bfloat16, name


def test_logical_constraints_resolve_under_a_mesh():
  # Every logical constraint (on params at init, on activations) must name as many axes as
  # the array has dims; this only shows once rules and a mesh are active. Tracing suffices.
  mesh = jax.make_mesh((1, 1), ('data', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('batch', 'data'), ('heads', 'tensor'), ('mlp', 'tensor'), ('vocab', 'tensor'))
  model = model_lib.build(tiny_model_config(**{'towers.image.pool': 'map'}), VOCAB)
  batch = make_batch()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = jax.eval_shape(model.init, jax.random.key(0), batch)
    out = jax.eval_shape(model.apply, variables, batch)
  assert out['embeddings']['text'].shape == (B, D)


def test_decode_variant():
  assert layers.decode_variant('B/16') == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                               patch_size=16)
  assert layers.decode_variant('S') == dict(width=384, depth=12, mlp_dim=1536, num_heads=6)
  assert layers.decode_variant('') == {}
  with pytest.raises(ValueError, match=r"'Q/16'.*'B'.*'mu'"):
    layers.decode_variant('Q/16')
  with pytest.raises(ValueError, match='unknown'):
    layers.decode_variant('B/x')


def test_variant_overrides_config_sizes():
  model = model_lib.build(
      tiny_model_config(**{'towers.image.variant': 'mu/8', 'towers.text.variant': 'mu'}), VOCAB)
  image, text = model.towers['image'], model.towers['text']
  assert (image.stack.width, image.stack.depth, image.stack.mlp_dim, image.stack.num_heads,
          image.patch_size) == (32, 1, 128, 2, 8)
  assert (text.stack.width, text.stack.depth) == (32, 1)
  with pytest.raises(ValueError, match=r'config\.model\.towers\.text.*patch'):
    model_lib.build(tiny_model_config(**{'towers.text.variant': 'mu/8'}), VOCAB)
  with pytest.raises(ValueError, match=r'config\.model\.towers\.image.*unknown'):
    model_lib.build(tiny_model_config(**{'towers.image.variant': 'XL'}), VOCAB)


def test_bad_values_fail_before_compute():
  with pytest.raises(ValueError, match=r'config\.model\.towers\.image.*pool'):
    model_lib.build(tiny_model_config(**{'towers.image.pool': 'max'}), VOCAB)
  with pytest.raises(ValueError, match=r'config\.model\.dtype'):
    model_lib.build(tiny_model_config(dtype='float8'), VOCAB)
  with pytest.raises(ValueError, match=r'config\.model\.heads\.classification\.input'):
    model_lib.build(tiny_model_config(**classes(2, 'audio')), VOCAB)
  with pytest.raises(ValueError, match=r'config\.model\.towers\.text.*divisible'):
    model_lib.build(tiny_model_config(**{'towers.text.num_heads': 3}), VOCAB)
  # Each tower takes its type's keys only; a head takes its own.
  with pytest.raises(ValueError, match=r"config\.model\.towers\.text has \['patch_size'\], "
                     r"which tower type 'text' does not take"):
    model_lib.build(tiny_model_config(**{'towers.text.patch_size': 4}), VOCAB)
  with pytest.raises(ValueError, match=r"config\.model\.towers\.image\.type = 'cnn': unknown"):
    model_lib.build(tiny_model_config(**{'towers.image.type': 'cnn'}), VOCAB)
  with pytest.raises(ValueError, match=r"config\.model\.heads\.classification has \['pool'\]"):
    model_lib.build(tiny_model_config(
        **{'heads.classification': dict(num_classes=2, input='image', pool='gap')}), VOCAB)


def test_image_size_not_divisible_by_patch():
  tower = vit.ViT(embed_dim=D, patch_size=5, stack=STACK)
  with pytest.raises(ValueError, match=r'16x16.*patch size 5'):
    tower.init(jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)))


def test_all_padding_text_row_stays_finite():
  # Padded evaluation batches contain texts with no real token; nothing may turn NaN,
  # neither the outputs nor the gradients (every key masked for every query).
  model = model_lib.build(tiny_model_config(), VOCAB)
  batch = make_batch()
  batch = {'text': batch['text'].at[1].set(0), 'text_mask': batch['text_mask'].at[1].set(False)}
  variables = model.init(jax.random.key(0), batch)
  loss = lambda v: jnp.sum(model.apply(v, batch)['embeddings']['text'] ** 3)
  value, grads = jax.jit(jax.value_and_grad(loss))(variables)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_l2_normalize_of_zero_vector_is_finite():
  # E.g. a gap-pooled all-padding text with a zero projection bias.
  x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(model_lib.l2_normalize(x), [[0.0, 0.0], [0.6, 0.8]], atol=1e-7)
  grad = jax.grad(lambda x: jnp.sum(model_lib.l2_normalize(x) * jnp.array([1.0, 2.0])))(x)
  assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------- speed features


def _loss_and_grads(model, params, batch):
  def loss(p):
    out = model.apply({'params': p}, batch, train=True, rngs={'dropout': jax.random.key(1)})
    return sum(jnp.sum(jnp.sin(e)) for e in out['embeddings'].values())
  return jax.value_and_grad(loss)(params)


def _assert_trees_close(a, b, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_scanned_and_unrolled_towers_agree(dropout):
  changes = {'towers.image.depth': 3, 'towers.text.depth': 2, 'towers.image.dropout': dropout,
             'towers.text.dropout': dropout}
  unrolled = model_lib.build(tiny_model_config(**changes), VOCAB)
  scanned = model_lib.build(tiny_model_config(scan_layers=True, **changes), VOCAB)
  batch = make_batch()
  params = params_of(unrolled.init(jax.random.key(0), batch))
  stacked = layout.scan_layout(params)

  # The scanned model's own params have exactly the converted layout, with a 'layers' axis.
  scanned_vars = scanned.init(jax.random.key(0), batch)
  assert jax.tree.map(jnp.shape, params_of(scanned_vars)) == jax.tree.map(jnp.shape, stacked)
  spec = nn.get_partition_spec(scanned_vars)['params']['image']['encoder']['blocks']
  assert spec['mlp']['fc1']['kernel'] == jax.sharding.PartitionSpec('layers', 'embed', 'mlp')

  a, b = unrolled.apply({'params': params}, batch), scanned.apply({'params': stacked}, batch)
  _assert_trees_close(a['embeddings'], b['embeddings'])
  _assert_trees_close(a['tokens'], b['tokens'])
  if dropout == 0.0:   # with dropout the two draw different masks per layer
    (la, ga), (lb, gb) = (_loss_and_grads(unrolled, params, batch),
                          _loss_and_grads(scanned, stacked, batch))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    _assert_trees_close(layout.scan_layout(ga), gb)


def test_layout_conversion_stacks_blocks_and_round_trips():
  rng = np.random.default_rng(0)
  tower = {'encoder': {f'block_{i}': {'w': rng.normal(size=(2, 3)), 'b': rng.normal(size=3)}
                       for i in range(4)} | {'encoder_norm': {'scale': np.ones(3)}},
           'proj': {'kernel': np.ones((3, 2))}}
  stacked = layout.scan_layout(tower)
  assert sorted(stacked['encoder']) == ['blocks', 'encoder_norm']
  np.testing.assert_array_equal(stacked['encoder']['blocks']['w'][2], tower['encoder']['block_2']['w'])
  assert stacked['encoder']['blocks']['b'].shape == (4, 3)
  assert layout.is_scanned(stacked) and layout.is_scanned(tower) is False
  _assert_trees_close(layout.unscan_layout(stacked), tower, atol=0)
  assert layout.match_layout(tower, like=stacked)['encoder'].keys() == stacked['encoder'].keys()
  assert layout.is_scanned({'proj': 1}) is None
  with pytest.raises(ValueError, match='gap in the numbering'):
    layout.scan_layout({'block_0': {'w': 1.0}, 'block_2': {'w': 1.0}})


def test_checkpoint_converts_between_layouts(tmp_path):
  """An unrolled run's checkpoint, restored and converted, drives the scanned model (and back)."""
  unrolled = model_lib.build(tiny_model_config(**{'towers.image.depth': 2}), VOCAB)
  scanned = model_lib.build(tiny_model_config(scan_layers=True, **{'towers.image.depth': 2}),
                            VOCAB)
  batch = make_batch()
  params = params_of(unrolled.init(jax.random.key(0), batch))
  saver = ckpt.Checkpointer(str(tmp_path), max_to_keep=1, async_save=False)
  saver.save(1, {'params': params}, {'step': 1})
  saver.close()

  loaded = ckpt.load_params(str(tmp_path))
  target = params_of(scanned.init(jax.random.key(1), batch))
  converted = ckpt.merge_params(target, layout.match_layout(loaded, like=target))
  want = unrolled.apply({'params': params}, batch)['embeddings']
  _assert_trees_close(scanned.apply({'params': converted}, batch)['embeddings'], want)
  back = layout.match_layout(converted, like=params)
  _assert_trees_close(unrolled.apply({'params': back}, batch)['embeddings'], want)


@pytest.mark.parametrize('remat,save', [('full', ()), ('save_dots', ()),
                                        ('named', ('qkv', 'mlp_hidden'))])
@pytest.mark.parametrize('scan', [False, True])
def test_remat_policies_change_memory_not_maths(remat, save, scan):
  batch = make_batch()
  reference = model_lib.build(tiny_model_config(scan_layers=scan), VOCAB)
  params = params_of(reference.init(jax.random.key(0), batch))
  model = model_lib.build(tiny_model_config(scan_layers=scan, remat=remat, remat_save=save), VOCAB)
  (la, ga), (lb, gb) = (_loss_and_grads(reference, params, batch),
                        _loss_and_grads(model, params, batch))
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  _assert_trees_close(ga, gb, atol=1e-6)


def test_remat_saves_what_the_policy_names():
  """The backward pass of a 'named' block keeps exactly the tagged activations as residuals."""
  x = jnp.ones((2, 5, W))
  def residual_names(remat, save):
    block = Encoder(STACK.replace(remat=remat, remat_save=save))
    params = params_of(block.init(jax.random.key(0), x))
    f = lambda p: jnp.sum(block.apply({'params': p}, x))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      jax.ad_checkpoint.print_saved_residuals(f, params)   # one line per residual, with its origin
    return out.getvalue().splitlines()
  full = residual_names('full', ())
  named = residual_names('named', ('mlp_hidden',))
  assert not any('mlp_hidden' in n for n in full)
  assert any("named 'mlp_hidden'" in n for n in named), named


def test_bad_speed_options_name_the_key():
  with pytest.raises(ValueError, match='config.model.remat'):
    model_lib.build(tiny_model_config(remat='some'), VOCAB)
  with pytest.raises(ValueError, match='config.model.remat_save'):
    model_lib.build(tiny_model_config(remat='named', remat_save=('nothing',)), VOCAB)
  with pytest.raises(ValueError, match='config.model.attention'):
    model_lib.build(tiny_model_config(attention='flash'), VOCAB)


def test_auto_attention_is_xla_off_gpu():
  assert layers.resolve_attention_impl('auto', jnp.bfloat16, 64) == (
      'cudnn' if jax.default_backend() == 'gpu' else 'xla')
  assert layers.resolve_attention_impl('auto', jnp.float32, 64) == 'xla'
  assert layers.resolve_attention_impl('explicit', jnp.bfloat16, 64) == 'explicit'


@pytest.mark.parametrize('name', ['encode', 'fusion', 'itm', 'logit_scale', 'apply', 'my-sensor'])
def test_a_modality_name_the_model_uses_itself_is_refused(name):
  """Towers become attributes of the model: a modality named like one of its methods, params or
  heads would replace it, so the config is refused, naming the key."""
  config = tiny_model_config(**{f'towers.{name}': dict(type='text', **TINY)})
  with pytest.raises(ValueError, match=f'config.model.towers.{name}: a modality name'):
    model_lib.build(config, VOCAB)
