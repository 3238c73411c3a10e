"""Mesh sizing, optimizer masks and frozen sub-trees, optimizer-state spec inference."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mmfusion import optim, sharding
from mmfusion.config import base


def test_mesh_shape_fills_minus_one_and_names_the_numbers():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 1, 'tensor': 1}, 8) == (8, 1, 1)
  assert sharding.mesh_shape({'data': 2, 'fsdp': -1, 'tensor': 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match='has 4 devices but 8 are available'):
    sharding.mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='does not divide the 8 devices'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='unknown axes'):
    sharding.mesh_shape({'model': 2}, 8)


def _params():
  return {'image': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
          'text': {'kernel': jnp.ones((4, 2))}, 'logit_scale': jnp.zeros(())}


def test_weight_decay_skips_vectors_and_scalars():
  cfg = dict(base().optim)
  cfg.update(lr=0.0 + 1e-9, warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
  tx, _ = optim.make(cfg, total_steps=10)
  params = _params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients, only decay moves a parameter.
  assert np.all(np.asarray(updates['image']['kernel']) < 0)
  assert np.all(np.asarray(updates['image']['bias']) == 0)
  assert float(updates['logit_scale']) == 0.0


def test_frozen_subtrees_never_move():
  cfg = dict(base().optim)
  cfg.update(warmup_steps=0)
  tx, _ = optim.make(cfg, total_steps=10, freeze=('image',))
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['image']['kernel'], np.ones((3, 4)))
  assert not np.allclose(params['text']['kernel'], 1.0)


def test_schedule_warms_up_then_decays():
  cfg = dict(base().optim)
  cfg.update(lr=1.0, warmup_steps=10, end_lr_ratio=0.0)
  s = optim.schedule(cfg, total_steps=100)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
  assert float(s(55)) < 1.0 and float(s(100)) < 1e-6


def test_opt_state_specs_follow_params_through_wrappers():
  params = _params()
  specs = {'image': {'kernel': P('embed', 'mlp'), 'bias': P('mlp')},
           'text': {'kernel': P('embed', None)}, 'logit_scale': P()}
  cfg = dict(base().optim)
  tx, _ = optim.make(cfg, total_steps=10, freeze=('text',))
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_specs = sharding.opt_state_specs(opt_abstract, specs)
  leaves = jax.tree_util.tree_flatten_with_path(opt_specs, is_leaf=lambda x: isinstance(x, P))[0]
  by_name = {}
  for path, spec in leaves:
    by_name.setdefault(jax.tree_util.keystr(path[-2:]), set()).add(spec)
  assert by_name["['image']['kernel']"] == {P('embed', 'mlp')}
  assert by_name["['image']['bias']"] == {P('mlp')}


def test_a_batch_that_contradicts_the_config_is_named():
  from mmfusion import train
  from mmfusion.config import base
  config = base()
  expected = train.init_batch(config)
  good = {k: np.zeros((4, *v.shape[1:]), v.dtype) for k, v in expected.items()}
  train.check_batch(good, expected)
  bad = dict(good, image=np.zeros((4, 48, 48, 3), np.float32))
  with pytest.raises(ValueError, match=r"batch\['image'\] has shape \(4, 48, 48, 3\).*image_size"):
    train.check_batch(bad, expected)
  with pytest.raises(ValueError, match="gave no 'text_mask'"):
    train.check_batch({k: v for k, v in good.items() if k != 'text_mask'}, expected)
