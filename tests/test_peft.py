"""LoRA (config.model.peft): an adapted model starts equal to its base, training moves only the
adapters (and the sub-trees peft.train names), merging the adapters into the kernels gives the
same outputs, a base checkpoint loads into an adapted model, and bad settings fail naming the
key and the layers there are."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion import checkpoint as ckpt
from mmfusion import optim
from mmfusion import peft
from mmfusion.models import layers
from test_train_program import program_and_batch, small_config

LORA = dict(type='lora', rank=4, alpha=8.0, targets=('qkv', 'attn_out', 'mlp'))


def _program(peft_config=None, scan=False):
  config = small_config('scan' if scan else '')
  config.unlock()
  config.model.peft.update(peft_config or {})
  config.optim.warmup_steps = 0
  config.lock()
  return program_and_batch(config)


def _outputs(program, params, batch):
  out = jax.jit(lambda p: program.model.apply({'params': p}, batch))(params)
  return {m: np.asarray(e) for m, e in out['embeddings'].items()}


@pytest.fixture(scope='module')
def trained():
  """Base and LoRA programs from the same seed; the LoRA one trained 3 steps."""
  base, batch = _program()
  lora, _ = _program(LORA)
  state = lora.init_state(0)
  initial = jax.tree.map(np.asarray, state.params)
  for _ in range(3):
    state, _ = lora.train_step(state, batch)
  return base, lora, batch, initial, jax.tree.map(np.asarray, state.params)


def test_at_init_the_adapted_model_is_the_base_model_exactly(trained):
  base, lora, batch, initial, _ = trained
  base_params = jax.tree.map(np.asarray, base.init_state(0).params)
  flat_base, flat_lora = ckpt.flatten(base_params), ckpt.flatten(initial)
  adapters = {p for p in flat_lora if p.rsplit('/', 1)[-1] in layers.LORA_PARAMS}
  assert set(flat_lora) - adapters == set(flat_base)
  # Every targeted projection of both towers: query, key, value, out, fc1, fc2 per block.
  assert len(adapters) == 2 * 6 * 2 * 2, sorted(adapters)[:6]
  for path, value in flat_base.items():
    np.testing.assert_array_equal(flat_lora[path], value, err_msg=path)
  expected, got = _outputs(base, base_params, batch), _outputs(lora, initial, batch)
  for m in expected:
    np.testing.assert_array_equal(got[m], expected[m])


def test_training_moves_only_the_adapters(trained):
  _, _, _, initial, after = trained
  moved = {p for p, v in ckpt.flatten(after).items()
           if not np.array_equal(v, ckpt.flatten(initial)[p])}
  assert moved, 'nothing learned'
  assert all(p.rsplit('/', 1)[-1] in layers.LORA_PARAMS for p in moved), sorted(moved)
  assert any(p.endswith('lora_b') for p in moved)     # B leaves zero: the model changed


def test_merged_kernels_give_the_adapted_models_outputs(trained):
  base, lora, batch, _, after = trained
  merged = peft.merge(after, scale=LORA['alpha'] / LORA['rank'])
  assert set(ckpt.flatten(merged)) == set(ckpt.flatten(base.init_state(0).params))
  adapted, plain = _outputs(lora, after, batch), _outputs(base, merged, batch)
  for m in adapted:
    np.testing.assert_allclose(plain[m], adapted[m], atol=1e-5)


def test_scanned_adapters_merge_layer_by_layer():
  lora, batch = _program(LORA, scan=True)
  base, _ = _program(scan=True)
  state = lora.init_state(0)
  for _ in range(2):
    state, _ = lora.train_step(state, batch)
  after = jax.tree.map(np.asarray, state.params)
  merged = peft.merge(after, scale=2.0)
  adapted, plain = _outputs(lora, after, batch), _outputs(base, merged, batch)
  for m in adapted:
    np.testing.assert_allclose(plain[m], adapted[m], atol=1e-5)


def test_the_adapter_is_the_low_rank_update_of_the_kernel():
  """HeadsDense with an adapter against W + (alpha / r) A B by hand, on a 3-D attention kernel."""
  layer = layers.HeadsDense(kernel_shape=(6, 2, 3), kernel_axes=('embed', 'heads', 'kv'),
                            in_dims=1, lora_rank=2, lora_scale=1.5)
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  params = nn.unbox(layer.init(jax.random.key(0), x))['params']
  params = dict(params, lora_b=np.random.default_rng(1).normal(size=(2, 2, 3)).astype(np.float32))
  w = params['kernel'] + 1.5 * np.einsum('ir,rhd->ihd', params['lora_a'], params['lora_b'])
  expected = np.einsum('bi,ihd->bhd', x, w) + params['bias']
  np.testing.assert_allclose(layer.apply({'params': params}, x), expected, rtol=1e-5, atol=1e-6)
  bound = 1 / np.sqrt(6)                 # A as PEFT initialises it: uniform, +-1/sqrt(fan in)
  assert np.abs(params['lora_a']).max() <= bound and np.abs(params['lora_a']).max() > bound / 2


def test_a_base_checkpoint_loads_into_an_adapted_model():
  base, _ = _program()
  lora, _ = _program(LORA)
  loaded = jax.tree.map(lambda x: np.asarray(x) + 1.0, base.init_state(0).params)
  current = jax.tree.map(np.asarray, lora.init_state(0).params)
  merged = ckpt.merge_params(current, loaded, keep_init=layers.LORA_PARAMS)
  for path, value in ckpt.flatten(merged).items():
    expected = ckpt.flatten(current if path.rsplit('/', 1)[-1] in layers.LORA_PARAMS
                            else loaded)[path]
    np.testing.assert_array_equal(value, expected, err_msg=path)
  with pytest.raises(ckpt.CheckpointError, match='lora_a'):
    ckpt.merge_params(current, loaded)      # without keep_init the adapters are a mismatch


def test_peft_train_names_sub_trees_that_learn_in_full():
  params = {'image': {'fc': {'kernel': jnp.ones((2, 2)), 'lora_a': jnp.ones((2, 1))}},
            'classification': {'head': {'kernel': jnp.ones((2, 3))}}}
  learns = optim.trainable(params, adapters_only=('classification',))
  assert learns == {'image': {'fc': {'kernel': False, 'lora_a': True}},
                    'classification': {'head': {'kernel': True}}}
  assert optim.trainable(params, freeze=('image',))['image']['fc']['lora_a'] is False


@pytest.mark.parametrize('change, message', [
    (dict(targets=('qkv', 'ffn')), "peft.targets = ('qkv', 'ffn'): ['ffn']; the layers LoRA "
                                   "can adapt are ['attn_out', 'mlp', 'qkv'] (qkv: "
                                   "query/key/value, attn_out: out, mlp: fc1/fc2)"),
    (dict(rank=0), 'config.model.peft.rank = 0: must be an integer >= 1'),
    (dict(type='ia3'), "config.model.peft.type = 'ia3'; expected 'lora'"),
    (dict(train=('classifier',)), "config.model.peft.train names 'classifier', which is not a "
                                  'top-level param sub-tree'),
])
def test_bad_peft_settings_fail_naming_the_key(change, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _program({**LORA, **change})


def test_export_writes_a_plain_workdir_of_the_merged_kernels(trained, tmp_path):
  """python -m mmfusion.peft: the merged params, the config with peft off; clear errors for a
  run without adapters and for an output that already holds checkpoints."""
  from mmfusion import api
  _, lora, _, _, after = trained
  config = lora.config.to_dict()
  source = tmp_path / 'lora'
  checkpointer = ckpt.Checkpointer(str(source), max_to_keep=1, async_save=False)
  checkpointer.save(3, {'params': after}, {'step': 3, 'config': config})
  checkpointer.wait()
  checkpointer.close()
  assert peft.main(['--workdir', str(source), '--out', str(tmp_path / 'merged')]) == 0
  merged = ckpt.load_params(str(tmp_path / 'merged'))
  expected = peft.merge(after, scale=LORA['alpha'] / LORA['rank'])
  assert set(ckpt.flatten(merged)) == set(ckpt.flatten(expected))
  for path, value in ckpt.flatten(expected).items():
    np.testing.assert_array_equal(ckpt.flatten(merged)[path], value, err_msg=path)
  step_dir = ckpt.find_step_dir(str(tmp_path / 'merged'))
  assert step_dir.endswith('/3') and api.load_config(step_dir).model.peft.type == ''
  with pytest.raises(api.RunError, match='already holds checkpoints'):
    peft.export(str(source), str(tmp_path / 'merged'))
  with pytest.raises(api.RunError, match='no adapters to merge'):
    peft.export(str(tmp_path / 'merged'), str(tmp_path / 'again'))
