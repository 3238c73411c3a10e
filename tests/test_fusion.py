"""Tests for mmfusion/models/fusion.py: output contract of every strategy, padding (no attention,
no influence), cross-attention / bottleneck layer placement, the pooled-vector strategies and
late heads against numpy, type embeddings, errors and remat. Tiny widths, jitted applies.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion.models import fusion
from mmfusion.models import layers
from mmfusion.models import towers

B, N, L, W_IMAGE, W_TEXT, W, C = 3, 4, 5, 8, 12, 16, 3
TEXT_LENGTHS = (5, 1, 3)      # one row with a single real token
SMALL = dict(width=W, depth=2, num_heads=2, mlp_dim=32)
STACK_FIELDS = {f.name for f in dataclasses.fields(layers.StackOptions)}


def make(strategy, **kw):
  """Fusion(strategy) with SMALL sizes. `kw` sets StackOptions fields (depth, dropout, remat,
  sow_weights, ...) and the Fusion's own (query, context, start_layer, gate, ...);
  cross_attention defaults to the text querying the image."""
  stack = layers.StackOptions(**{**SMALL, **{k: v for k, v in kw.items() if k in STACK_FIELDS}})
  own = {k: v for k, v in kw.items() if k not in STACK_FIELDS}
  if strategy == 'cross_attention':
    own = {'query': 'text', 'context': 'image', **own}
  return fusion.Fusion(strategy, stack, **own)


def lengths_mask(lengths, size):
  return np.arange(size)[None, :] < np.asarray(lengths)[:, None]


def make_inputs(seed=0, image_lengths=(N,) * B, text_lengths=TEXT_LENGTHS):
  """(tokens, masks, pooled) as the towers give them: image [B,N,8], text [B,L,12]."""
  rng = np.random.default_rng(seed)
  tokens = {'image': rng.normal(size=(B, N, W_IMAGE)).astype(np.float32),
            'text': rng.normal(size=(B, L, W_TEXT)).astype(np.float32)}
  masks = {'image': lengths_mask(image_lengths, N), 'text': lengths_mask(text_lengths, L)}
  pooled = {'image': rng.normal(size=(B, W_IMAGE)).astype(np.float32),
            'text': rng.normal(size=(B, W_TEXT)).astype(np.float32)}
  return tokens, masks, pooled


def with_garbage(tokens, masks, value):
  """tokens with every padded position set to `value`."""
  return {m: np.where(masks[m][..., None], x, value).astype(np.float32)
          for m, x in tokens.items()}


def random_params(module, *inputs, seed=0):
  """Params of the module's shapes drawn at random (no init run: eval_shape is cheap), so no
  zero-init head or token makes a test pass by accident. LayerNorm scales stay near 1."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, x):
    base = 1.0 if path[-1].key == 'scale' else 0.0
    return jnp.asarray(base + 0.3 * rng.standard_normal(x.shape), x.dtype)
  return {'params': jax.tree_util.tree_map_with_path(draw, shapes)}


def applier(module, **kw):
  """Jitted (variables, tokens, masks, pooled) -> (outputs, intermediates)."""
  def run(variables, tokens, masks, pooled):
    out, state = module.apply(variables, tokens, masks, pooled, mutable=['intermediates'], **kw)
    return out, state.get('intermediates', {})
  return jax.jit(run)


def sown_weights(intermediates):
  """{'block/attn': weights [B,H,Lq,Lk]} of every attention that sowed."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [p.key for p in path if hasattr(p, 'key')]
    if keys[-1] == 'attention_weights':
      found['/'.join(keys[:-1])] = np.asarray(leaf)
  return found


def check_shapes(strategy, out, query='text'):
  names = ['image', 'text']
  sizes = {'image': N, 'text': L}
  with_tokens = {'cross_attention': [query], 'co_attention': names, 'early': names,
                 'bottleneck': names}.get(strategy, [])
  assert sorted(out['tokens_by_modality']) == with_tokens
  for m in with_tokens:
    assert out['tokens_by_modality'][m].shape == (B, sizes[m], W)
  summaries = [query] if strategy == 'cross_attention' else names
  assert sorted(out['pooled_by_modality']) == summaries
  for m in summaries:
    assert out['pooled_by_modality'][m].shape == (B, W)
  if strategy == 'late':
    assert out['pooled'] is None
  else:
    assert out['pooled'].shape == (B, W)
  if strategy in ('weighted_sum', 'late'):
    assert out['tokens'] is None and out['mask'] is None
    return
  cls_tokens = {'cross_attention': 1, 'early': 1, 'co_attention': 2, 'bottleneck': 2}[strategy]
  total = cls_tokens + sum(sizes[m] for m in with_tokens) + 4 * (strategy == 'bottleneck')
  assert out['tokens'].shape == (B, total, W)
  assert out['mask'].shape == (B, total) and out['mask'].dtype == jnp.bool_


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize('strategy', fusion.STRATEGIES)
def test_shapes_names_and_head(strategy):
  inputs = make_inputs()
  module = make(strategy)
  boxed = jax.eval_shape(module.init, jax.random.key(0), *inputs)['params']
  # Every param carries one logical name (or None) per dim, from the known set.
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    assert set(leaf.names) <= set(layers.LOGICAL_AXES) | {None}, jax.tree_util.keystr(path)

  variables = random_params(module, *inputs)
  out, _ = applier(module)(variables, *inputs)
  check_shapes(strategy, out)
  for leaf in jax.tree.leaves(out):
    assert np.all(np.isfinite(leaf))
  if strategy in ('co_attention', 'bottleneck'):   # pooled is the mean of the stream summaries
    np.testing.assert_allclose(out['pooled'], (out['pooled_by_modality']['image']
                                               + out['pooled_by_modality']['text']) / 2, atol=1e-6)

  head = fusion.classifier(module, C)
  assert (head.num_classes, head.strategy) == (C, strategy)
  head_vars = random_params(head, out)
  logits = head.apply(head_vars, out)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  assert sorted(head_vars['params']) == (['combine_logits', 'head_image', 'head_text']
                                         if strategy == 'late' else ['head'])


def expected_key_mask(strategy, block, attn, masks, start_layer, num_bottleneck=4):
  """[B, Lk] which keys a fusion attention may see, from the docs (cls always real)."""
  real = lambda m: np.concatenate([np.ones((B, 1), bool), masks[m]], axis=1)
  if strategy == 'early':
    return np.concatenate([np.ones((B, 1), bool), masks['image'], masks['text']], axis=1)
  if strategy == 'cross_attention':   # text queries the image
    return real('text') if attn == 'self_attn' else masks['image']
  m, _, layer = block.partition('_layer_')
  other = {'image': 'text', 'text': 'image'}[m]
  if strategy == 'co_attention':
    return real(m if attn == 'self_attn' else other)
  if int(layer) >= start_layer:      # bottleneck: the shared tokens follow the stream's own
    return np.concatenate([real(m), np.ones((B, num_bottleneck), bool)], axis=1)
  return real(m)


@pytest.mark.parametrize('strategy', fusion.TOKEN_STRATEGIES)
def test_padding_gets_no_attention_and_changes_nothing(strategy):
  inputs = make_inputs(image_lengths=(4, 2, 3))   # both modalities padded here
  tokens, masks, pooled = inputs
  # The model's build context with attention 'xla' and sow_attention: it gives the stack the
  # 'explicit' implementation, the one that sows.
  stack = towers.BuildContext(embed_dim=W, attention='xla', sow_attention=True).stack(SMALL)
  assert stack.attention_impl == 'explicit' and stack.sow_weights
  module = fusion.Fusion(strategy, stack, start_layer=1,
                         **({'query': 'text', 'context': 'image'}
                            if strategy == 'cross_attention' else {}))
  variables = random_params(module, *inputs)
  run = applier(module)
  out, intermediates = run(variables, *inputs)

  weights = sown_weights(intermediates)
  cross = {'cross_attention': 1, 'co_attention': 4}.get(strategy, 0)
  streams = 2 if strategy in ('co_attention', 'bottleneck') else 1
  assert len(weights) == 2 * streams + cross
  for name, w_bhqk in weights.items():
    block, attn = name.split('/')
    key_mask_bk = expected_key_mask(strategy, block, attn, masks, start_layer=1)
    assert w_bhqk.shape[-1] == key_mask_bk.shape[1], name
    # Exactly zero on padded keys, positive on real ones; every row a distribution.
    np.testing.assert_array_equal(w_bhqk > 0, np.broadcast_to(key_mask_bk[:, None, None, :],
                                                              w_bhqk.shape), err_msg=name)
    np.testing.assert_allclose(w_bhqk.sum(-1), 1.0, atol=1e-5, err_msg=name)

  for garbage in (1e6, np.nan):
    out_g, _ = run(variables, with_garbage(tokens, masks, garbage), masks, pooled)
    jax.tree.map(np.testing.assert_array_equal, out, out_g)   # padded positions too

  # The fused kernel path ('xla', nothing sown) computes the same.
  plain = make(strategy, start_layer=1, attention_impl='xla')
  out_xla, _ = applier(plain)(variables, *inputs)
  np.testing.assert_allclose(out_xla['pooled'], out['pooled'], atol=1e-5)


# ----------------------------------------------------------------------------- stream layouts


@pytest.mark.parametrize('start_layer', [0, 2, 3])
def test_cross_attention_only_from_start_layer(start_layer):
  module = make('cross_attention', depth=3, start_layer=start_layer)
  params = jax.eval_shape(module.init, jax.random.key(0), *make_inputs())['params']
  for i in range(3):
    cross = i >= start_layer
    for name in ('cross_attn', 'ln_cross', 'ln_context'):
      assert (name in params[f'layer_{i}']) == cross, (i, name)
    assert 'self_attn' in params[f'layer_{i}']
  assert 'in_image' in params and 'in_text' in params


def test_cross_attention_image_queries_text():
  tokens, masks, pooled = make_inputs()
  module = make('cross_attention', query='image', context='text', sow_weights=True,
                attention_impl='explicit')
  variables = random_params(module, tokens, masks, pooled)
  run = applier(module)
  out, intermediates = run(variables, tokens, masks, pooled)
  check_shapes('cross_attention', out, query='image')
  for name, w_bhqk in sown_weights(intermediates).items():
    if name.endswith('cross_attn'):
      assert np.all(w_bhqk[~np.broadcast_to(masks['text'][:, None, None], w_bhqk.shape)] == 0)
  out_g, _ = run(variables, with_garbage(tokens, masks, 1e6), masks, pooled)
  jax.tree.map(np.testing.assert_array_equal, out, out_g)
  # The image stream does see the text: new real text tokens change it.
  other, _, _ = make_inputs(seed=1)
  out_t, _ = run(variables, {'image': tokens['image'], 'text': other['text']}, masks, pooled)
  assert not np.allclose(out_t['pooled'], out['pooled'], atol=1e-4)


def test_bottleneck_from_depth_keeps_streams_apart():
  tokens, masks, pooled = make_inputs()
  other_text = make_inputs(seed=1)[0]['text']
  swapped = {'image': tokens['image'], 'text': other_text}
  # The bottleneck must first collect from both streams (one layer) before a stream can read
  # the other modality: exchanging from depth - 1 on still leaves the streams unimodal, and
  # only the final bottleneck tokens (the tail of 'tokens') mix the two.
  for start_layer, apart in ((2, True), (1, True), (0, False)):
    module = make('bottleneck', start_layer=start_layer)
    variables = random_params(module, tokens, masks, pooled)
    run = applier(module)
    out, _ = run(variables, tokens, masks, pooled)
    out_s, _ = run(variables, swapped, masks, pooled)
    image, image_s = ((o['pooled_by_modality']['image'], o['tokens_by_modality']['image'])
                      for o in (out, out_s))
    if apart:
      jax.tree.map(np.testing.assert_array_equal, image, image_s)
    else:
      assert not np.allclose(image[0], image_s[0], atol=1e-4)
    assert not np.allclose(out['tokens_by_modality']['text'], out_s['tokens_by_modality']['text'])
    bottleneck, bottleneck_s = out['tokens'][:, -4:], out_s['tokens'][:, -4:]
    if start_layer == 2:   # never exchanged: the learned init, normalised
      np.testing.assert_array_equal(bottleneck, bottleneck_s)
    else:
      assert not np.allclose(bottleneck, bottleneck_s, atol=1e-4)


def test_early_fusion_type_embeddings_tell_modalities_apart():
  # Two modalities of one shape, with the same input projection: only the type embedding
  # says which tokens are whose, so swapping their contents is invisible without it.
  rng = np.random.default_rng(0)
  x, y = (rng.normal(size=(B, N, W_IMAGE)).astype(np.float32) for _ in range(2))
  masks = {'a': np.ones((B, N), bool), 'b': np.ones((B, N), bool)}
  pooled = {'a': x[:, 0], 'b': y[:, 0]}
  module = make('early')
  variables = random_params(module, {'a': x, 'b': y}, masks, pooled)
  params = dict(variables['params'])
  params['in_b'] = params['in_a']
  run = applier(module)

  def swap_gap(type_embedding):
    v = {'params': dict(params, type_embedding=type_embedding)}
    out_xy, _ = run(v, {'a': x, 'b': y}, masks, pooled)
    out_yx, _ = run(v, {'a': y, 'b': x}, masks, pooled)
    return np.max(np.abs(out_xy['pooled'] - out_yx['pooled'])), out_xy['pooled']

  same = jnp.tile(params['type_embedding'][:1], (2, 1))
  gap_same, pooled_same = swap_gap(same)
  gap_distinct, pooled_distinct = swap_gap(params['type_embedding'])
  assert gap_same < 1e-5
  assert gap_distinct > 1e-3
  assert not np.allclose(pooled_same, pooled_distinct, atol=1e-3)


# ----------------------------------------------------------------------------- pooled strategies


def test_weighted_sum_weights_against_numpy():
  tokens, masks, pooled = make_inputs()
  module = make('weighted_sum', gate='weights', sow_weights=True, attention_impl='explicit')
  variables = nn.unbox(module.init(jax.random.key(0), tokens, masks, pooled))
  params = variables['params']
  proj = {m: pooled[m] @ np.asarray(params[f'in_{m}']['kernel']) + np.asarray(params[f'in_{m}']['bias'])
          for m in ('image', 'text')}
  run = applier(module)
  out, intermediates = run(variables, tokens, masks, pooled)
  # Equal (zero) init: the plain mean of the projections.
  np.testing.assert_allclose(out['pooled'], (proj['image'] + proj['text']) / 2, atol=1e-5)
  np.testing.assert_allclose(out['pooled_by_modality']['text'], proj['text'], atol=1e-5)
  np.testing.assert_allclose(intermediates['modality_weights'][0], 0.5)

  logits = np.array([1.0, -0.5], np.float32)   # sorted order: image, text
  out, _ = run({'params': dict(params, modality_logits=logits)}, tokens, masks, pooled)
  w = np.exp(logits) / np.exp(logits).sum()
  np.testing.assert_allclose(out['pooled'], w[0] * proj['image'] + w[1] * proj['text'], atol=1e-5)


def test_weighted_sum_gates_against_numpy():
  tokens, masks, pooled = make_inputs()
  module = make('weighted_sum', gate='gates', sow_weights=True, attention_impl='explicit')
  variables = random_params(module, tokens, masks, pooled)
  params = jax.tree.map(np.asarray, variables['params'])
  proj = [pooled[m] @ params[f'in_{m}']['kernel'] + params[f'in_{m}']['bias']
          for m in ('image', 'text')]
  gates = 1 / (1 + np.exp(-(np.concatenate(proj, -1) @ params['gate']['kernel']
                            + params['gate']['bias'])))
  out, intermediates = applier(module)(variables, tokens, masks, pooled)
  sown = np.asarray(intermediates['modality_weights'][0])
  assert sown.shape == (B, 2) and np.all((sown > 0) & (sown < 1))
  np.testing.assert_allclose(sown, gates, atol=1e-5)
  np.testing.assert_allclose(out['pooled'], gates[:, :1] * proj[0] + gates[:, 1:] * proj[1],
                             atol=1e-4)


@pytest.mark.parametrize('combine', fusion.COMBINES)
def test_late_head_combines_per_modality_logits(combine):
  inputs = make_inputs()
  module = make('late', combine=combine)
  out, _ = applier(module)(random_params(module, *inputs), *inputs)
  head = fusion.classifier(module, C)   # late fusion's combine is the fusion's key
  assert head.combine == combine
  head_params = jax.tree.map(np.asarray, random_params(head, out, seed=1)['params'])
  logits = [np.asarray(out['pooled_by_modality'][m]) @ head_params[f'head_{m}']['kernel']
            + head_params[f'head_{m}']['bias'] for m in ('image', 'text')]
  if combine == 'mean':
    expected = (logits[0] + logits[1]) / 2
  else:
    w = np.exp(head_params['combine_logits']) / np.exp(head_params['combine_logits']).sum()
    expected = w[0] * logits[0] + w[1] * logits[1]
  np.testing.assert_allclose(head.apply({'params': head_params}, out), expected, atol=1e-5)


# ----------------------------------------------------------------------------- errors, remat


def _trace(module, tokens, masks, pooled):
  jax.eval_shape(module.init, jax.random.key(0), tokens, masks, pooled)


def test_config_errors():
  with pytest.raises(ValueError, match=r"unknown fusion strategy 'nope'.*'cross_attention'"):
    make('nope')
  for start_layer in (-1, 3):
    with pytest.raises(ValueError, match=r'start_layer=.*outside \[0, depth=2\]'):
      make('bottleneck', start_layer=start_layer)
  with pytest.raises(ValueError, match='query and context'):
    make('cross_attention', query='image', context='image')
  with pytest.raises(ValueError, match='gate='):
    make('weighted_sum', gate='softmax')
  with pytest.raises(ValueError, match='remat='):
    make('early', remat='sometimes')
  with pytest.raises(ValueError, match='combine='):
    make('late', combine='max')
  with pytest.raises(ValueError, match='combine='):
    fusion.Classifier(C, strategy='late', combine='max')


def test_config_keys_per_strategy():
  """config.model.fusion takes its strategy's keys only (fusion.OPTIONS), defaults filled in;
  errors name the config key."""
  assert fusion.options({'strategy': ''}) == {}
  assert fusion.options({'strategy': 'late'}) == {'strategy': 'late', 'width': 96,
                                                  'combine': 'learned', 'modality_dropout': {}}
  opts = fusion.options(dict(strategy='cross_attention', query='text', context='image', depth=3))
  assert opts == {'strategy': 'cross_attention', **fusion.OPTIONS['cross_attention'],
                  'query': 'text', 'context': 'image', 'depth': 3}
  with pytest.raises(ValueError, match=r"config\.model\.fusion\.strategy = 'nope': unknown"):
    fusion.options({'strategy': 'nope'})
  with pytest.raises(ValueError, match=r"config\.model\.fusion has \['gate'\], which strategy "
                     r"'early' does not take"):
    fusion.options({'strategy': 'early', 'gate': 'weights'})
  with pytest.raises(ValueError, match=r"config\.model\.fusion: strategy 'cross_attention' needs "
                     r"\['context', 'query'\]"):
    fusion.options({'strategy': 'cross_attention'})
  with pytest.raises(ValueError, match=r"config\.model\.fusion has \['width'\] but no strategy"):
    fusion.options({'strategy': '', 'width': 8})
  # A bad value of a known key fails in build, under the config key too.
  stack_of = towers.BuildContext(embed_dim=W).stack
  with pytest.raises(ValueError, match=r'config\.model\.fusion: .*start_layer=5'):
    fusion.build(dict(strategy='bottleneck', start_layer=5), stack_of)
  assert fusion.build({'strategy': ''}, stack_of) is None
  module = fusion.build(dict(strategy='bottleneck', num_bottleneck=2, depth=1), stack_of)
  assert (module.num_bottleneck, module.stack.depth, module.width) == (2, 1, 96)


def test_modality_errors():
  tokens, masks, pooled = make_inputs()
  available = r"it has \['image', 'text'\]"
  with pytest.raises(ValueError, match="cross_attention queries 'audio', which the batch lacks; "
                     + available):
    _trace(make('cross_attention', query='audio'), tokens, masks, pooled)
  with pytest.raises(ValueError, match="context 'audio', which the batch lacks; " + available):
    _trace(make('cross_attention', context='audio'), tokens, masks, pooled)
  for strategy in ('early', 'weighted_sum'):
    with pytest.raises(ValueError, match=strategy + r" needs at least two modalities; the batch "
                       r"has \['text'\]"):
      _trace(make(strategy), *({'text': d['text']} for d in (tokens, masks, pooled)))
  three = lambda d: dict(d, audio=d['image'])
  with pytest.raises(ValueError, match=r"co_attention runs exactly two streams; the batch has 3 "
                     r"modalities: \['audio', 'image', 'text'\]"):
    _trace(make('co_attention'), three(tokens), three(masks), three(pooled))
  with pytest.raises(ValueError, match="no mask"):
    _trace(make('early'), tokens, {'text': masks['text']}, pooled)
  late_out = {'pooled': None, 'pooled_by_modality': {'image': jnp.zeros((B, W))}}
  with pytest.raises(ValueError, match='no fused pooled vector'):
    fusion.Classifier(C, strategy='early').init(jax.random.key(0), late_out)


def test_three_modalities_early_and_bottleneck():
  tokens, masks, pooled = (dict(d, audio=d['image']) for d in make_inputs())
  for strategy in ('early', 'bottleneck'):
    module = make(strategy, depth=1)
    out = jax.eval_shape(module.init_with_output, jax.random.key(0), tokens, masks, pooled)[0]
    assert sorted(out['tokens_by_modality']) == ['audio', 'image', 'text']
    assert out['tokens_by_modality']['audio'].shape == (B, N, W)


def test_remat_same_outputs_and_grads():
  inputs = make_inputs()
  results = []
  for remat in ('none', 'full'):
    module = make('cross_attention', start_layer=1, remat=remat)
    variables = random_params(module, *inputs)

    def loss(params, module=module):
      out = module.apply({'params': params}, *inputs)
      return jnp.sum(out['pooled'] ** 2) + jnp.sum(out['tokens_by_modality']['text'] ** 2)
    results.append(jax.jit(jax.value_and_grad(loss))(variables['params']))
  (loss_a, grads_a), (loss_b, grads_b) = results
  assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)   # same param names
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_a, grads_b)


def test_dropout_in_training_only():
  tokens, masks, pooled = make_inputs()
  module = make('early', dropout=0.5)
  variables = random_params(module, tokens, masks, pooled)

  @jax.jit
  def train(tokens, key):
    return module.apply(variables, tokens, masks, pooled, train=True, rngs={'dropout': key})
  key = jax.random.key(1)
  out = train(tokens, key)
  eval_out, _ = applier(module)(variables, tokens, masks, pooled)
  assert np.all(np.isfinite(out['pooled']))
  assert not np.allclose(out['pooled'], eval_out['pooled'])
  # Padding stays inert in training too.
  out_g = train(with_garbage(tokens, masks, 1e6), key)
  np.testing.assert_array_equal(out['pooled'], out_g['pooled'])
