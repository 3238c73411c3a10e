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
