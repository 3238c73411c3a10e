"""Checkpoint round trip, strict partial loading and its readable mismatch errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion import checkpoint as ckpt


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return {'step': jnp.asarray(7, jnp.int32),
          'params': {'image': {'proj': {'kernel': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}},
                     'text': {'emb': jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)},
                     'logit_scale': jnp.asarray(2.0)},
          'opt_state': {'mu': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
          'rng': jnp.asarray([1, 2], jnp.uint32)}


def test_round_trip_restores_every_leaf(tmp_path):
  c = ckpt.Checkpointer(str(tmp_path), max_to_keep=2, async_save=True)
  state = _state()
  c.save(7, state, {'step': 7, 'data': {'examples_seen': 70}})
  c.wait()
  assert c.latest_step() == 7
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, meta = c.restore(7, abstract)
  assert meta['data']['examples_seen'] == 70
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  c.close()


def test_restore_into_a_different_model_lists_the_differences(tmp_path):
  c = ckpt.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
  c.save(1, _state(), {'step': 1})
  other = _state()
  other['params']['image']['proj']['kernel'] = jnp.zeros((5, 3))
  other['params']['head'] = {'kernel': jnp.zeros((3, 2))}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other)
  with pytest.raises(ckpt.CheckpointError) as e:
    c.restore(1, abstract)
  msg = str(e.value)
  assert 'params/head/kernel' in msg and 'missing from the checkpoint' in msg
  assert "current config (5, 3) vs checkpoint (4, 3)" in msg
  c.close()


def test_load_params_subtree_and_merge(tmp_path):
  c = ckpt.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
  saved = _state(seed=1)
  c.save(3, saved, {'step': 3})
  c.close()
  loaded = ckpt.load_params(str(tmp_path), load='image')   # a workdir works as the path
  assert set(loaded) == {'proj'}
  init = jax.tree.map(np.asarray, _state(seed=2)['params'])
  merged = ckpt.merge_params(init, loaded, into='image')
  np.testing.assert_array_equal(merged['image']['proj']['kernel'],
                                saved['params']['image']['proj']['kernel'])
  np.testing.assert_array_equal(merged['text']['emb'], init['text']['emb'])  # untouched


def test_merge_refuses_shape_and_name_mismatch_with_a_diff():
  init = {'image': {'proj': {'kernel': np.zeros((4, 3))}}, 'head': {'kernel': np.zeros((3, 5))}}
  loaded = {'image': {'proj': {'kernel': np.zeros((4, 2))}, 'extra': np.zeros(2)},
            'head': {'kernel': np.zeros((3, 5))}}
  with pytest.raises(ckpt.CheckpointError) as e:
    ckpt.merge_params(init, loaded)
  msg = str(e.value)
  assert '~ image/proj/kernel: model (4, 3) vs checkpoint (4, 2)' in msg
  assert '+ image/extra (2,): in the checkpoint, unknown to the model' in msg
  # Skipping the head keeps it at init, but the image mismatch still fails.
  loaded['head'] = {'kernel': np.zeros((3, 9))}
  with pytest.raises(ckpt.CheckpointError, match='image/proj/kernel'):
    ckpt.merge_params(init, loaded, skip=('head',))


def test_missing_and_unreadable_checkpoints_name_the_path(tmp_path):
  with pytest.raises(ckpt.CheckpointError, match='does not exist'):
    ckpt.find_step_dir(str(tmp_path / 'nope'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ckpt.CheckpointError, match='no checkpoint under'):
    ckpt.find_step_dir(str(tmp_path / 'empty'))
  bad = tmp_path / 'bad' / 'checkpoints' / '5' / 'state'
  bad.mkdir(parents=True)
  (bad / 'garbage').write_text('not a checkpoint')
  with pytest.raises(ckpt.CheckpointError, match='unreadable'):
    ckpt.load_params(str(tmp_path / 'bad'))


def _legacy_albef_and_coca_params(new):
  """The params of `new` (a current model's) laid out as mmfusion wrote them before heads were
  named as in config.model.heads: written out by hand from that layout."""
  return {
      'image': new['image'], 'text': new['text'], 'fusion': new['fusion'],
      'logit_scale': new['logit_scale'], 'logit_bias': new['logit_bias'],
      'head': {'kernel': new['classification']['dense']['kernel'],
               'bias': new['classification']['dense']['bias']},
      'itm_head': {'head': new['itm']['classifier']['head']},
      'mlm_head': {'kernel': new['mlm']['vocab']['kernel'], 'bias': new['mlm']['vocab']['bias']},
      'caption_decoder': new['caption']['decoder'],
  }


def test_legacy_head_names_load_into_the_current_layout():
  from mmfusion.models import model as model_lib
  towers = dict(image=dict(type='vit', patch_size=8, width=16, depth=1, mlp_dim=32, num_heads=2),
                text=dict(type='text', width=16, depth=1, mlp_dim=32, num_heads=2))
  model_config = dict(
      embed_dim=8, dtype='float32', param_dtype='float32', attention='auto', remat='none',
      remat_save=(), scan_layers=False, temperature_init=10.0, temperature_max=100.0,
      bias_init=0.0, towers=towers,
      fusion=dict(strategy='cross_attention', width=16, depth=1, num_heads=2, mlp_dim=32,
                  query='text', context='image'),
      heads=dict(classification=dict(num_classes=3, input='image'), itm=dict(pair=('image', 'text')),
                 mlm=dict(modality='text', context='image'),
                 caption=dict(target='text', context='image', width=16, depth=1, mlp_dim=32,
                              num_heads=2, max_len=8)))
  model = model_lib.build(model_config, vocab_size=20)
  batch = {'image': jnp.zeros((2, 16, 16, 3)), 'text': jnp.ones((2, 8), jnp.int32),
           'text_mask': jnp.ones((2, 8), bool)}
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), batch)['params'])
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  upgraded, renamed = ckpt.upgrade_legacy(_legacy_albef_and_coca_params(params))
  assert sorted(renamed) == ['caption_decoder -> caption/decoder', 'head -> classification/dense',
                             'itm_head -> itm/classifier', 'mlm_head -> mlm/vocab']
  merged = ckpt.merge_params(params, upgraded)      # strict: names and shapes must all match
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  # A current tree passes unchanged.
  same, renamed = ckpt.upgrade_legacy(params)
  assert renamed == [] and all(same[k] is params[k] for k in params) and same.keys() == params.keys()


def test_the_default_run_keeps_the_param_layout_of_its_old_checkpoints():
  """Checkpoints of the default run (configs/shapes_clip.py) written before the modality-generic
  redesign (commit 8c17d58) must still resume: the current model's params have exactly their
  names and shapes. The reference lists what that commit's model held, with a 200-token vocab."""
  import json
  import os
  from configs import shapes_clip
  from mmfusion import train
  from mmfusion.models import model as model_lib
  with open(os.path.join(os.path.dirname(__file__), 'default_run_params_8c17d58.json')) as f:
    old = {path: tuple(shape) for path, shape in json.load(f).items()}
  config = shapes_clip.get_config()
  model = model_lib.build(config.model, vocab_size=200)
  params = jax.eval_shape(model.init, jax.random.key(0), train.init_batch(config))['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  assert {path: tuple(x.shape) for path, x in ckpt.flatten(params).items()} == old
