"""Gradient accumulation (config.accum_steps, mmfusion/accumulate.py): k micro-batches of b are
one batch of k * b, in the loss, the metrics, the gradient and the updated parameters, for every
kind of objective: contrastive (softmax, sigmoid), ALBEF's ITM with in-batch negatives and MLM,
VQA and captioning through the fusion, classification."""
import re

import jax
import numpy as np
import pytest

from mmfusion import accumulate
from mmfusion import config as config_lib
from test_fused_model import ALL_HEADS, PAIRS, VQA, batch_for, fused_config, program_for
from test_train_program import program_and_batch, small_config


def test_micro_batches_interleave_the_rows_and_merge_back_in_order():
  x = np.arange(12 * 2).reshape(12, 2)
  micro = np.asarray(accumulate.split(x, 3))
  assert micro.shape == (3, 4, 2)
  np.testing.assert_array_equal(micro[1, :, 0], x[[1, 4, 7, 10], 0])   # rows j, j + k, ...
  np.testing.assert_array_equal(np.asarray(accumulate.merge(micro)), x)


CONTRASTIVE = {
    'softmax': {'softmax_contrastive': dict(weight=1.0, pairs=PAIRS)},
    'sigmoid': {'sigmoid_contrastive': dict(weight=1.0, pairs=PAIRS)},
}
FUSED = {
    # ITM draws its hard negatives from the whole batch; MLM divides by the masked count.
    'albef': ({'softmax_contrastive': dict(weight=1.0, pairs=PAIRS), 'itm': dict(weight=1.0),
               'mlm': dict(weight=1.0)},
              {'itm': ALL_HEADS['itm'], 'mlm': ALL_HEADS['mlm']}),
    'vqa_captioning': ({'vqa': dict(weight=1.0), 'captioning': dict(weight=1.0)},
                       {'vqa': VQA, 'caption': ALL_HEADS['caption']}),
    'classification': ({'classification': dict(weight=1.0)},
                       {'classification': dict(num_classes=5, input='image')}),
}


def _programs(kind, k):
  """(program, batch) of a config of `kind` at accum_steps 1 and k (same batch, same init)."""
  out = []
  for steps in (1, k):
    if kind in CONTRASTIVE:
      config = small_config()
      config.unlock()
      config.objectives = CONTRASTIVE[kind]
      config.accum_steps = steps
      config.lock()
      out.append(program_and_batch(config))
    else:
      objectives, heads = FUSED[kind]
      config = fused_config(objectives, heads=heads)
      config.unlock()
      config.accum_steps = steps
      config.optim.weight_decay = 0.0
      if kind == 'classification':
        config.data.inputs = ('image', 'label')
      config.lock()
      program = program_for(config)
      batch = {**batch_for(config), 'label': batch_for(config)['answer']}
      batch = {key: batch[key] for key in program.expected_batch}
      out.append((program, jax.device_put(batch, program.batch_sharding)))
  return out


# Softmax contrastive is checked on meshes against one device (test_scaleout.py), ALBEF's
# objectives gradient leaf by gradient leaf below.
@pytest.mark.parametrize('kind', ['sigmoid', 'vqa_captioning', 'classification'])
def test_k_micro_batches_equal_one_batch_of_k_times_b(kind):
  k = 4
  (one, batch), (accumulated, _) = _programs(kind, k)
  state_one, state_acc = one.init_state(0), accumulated.init_state(0)
  for step in range(2):
    state_one, m_one = one.train_step(state_one, batch)
    state_acc, m_acc = accumulated.train_step(state_acc, batch)
    assert set(m_acc) == set(m_one)
    for key in m_one:
      np.testing.assert_allclose(float(m_acc[key]), float(m_one[key]), rtol=1e-5, atol=1e-6,
                                 err_msg=f'{kind}: step {step} {key}')
  flat_one = jax.tree_util.tree_leaves_with_path(state_one.params)
  flat_acc = jax.tree.leaves(state_acc.params)
  for (path, a), b in zip(flat_one, flat_acc):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                               err_msg=f'{kind}: {jax.tree_util.keystr(path)}')


def test_the_accumulated_gradient_is_the_batch_gradient():
  """Against jax.grad of the whole batch's loss, leaf by leaf, on the ALBEF objectives."""
  from mmfusion import objectives
  (program, batch), _ = _programs('albef', 4)
  params = program.init_state(0).params
  rngs = {name: jax.random.key(i) for i, name in enumerate(('dropout', 'sample', 'mask'))}
  objective_config = program.config.objectives

  def loss_of(out):
    return objectives.total_loss(objective_config, out, batch)

  expected_loss, expected = jax.jit(jax.value_and_grad(
      lambda p: loss_of(program.model.apply({'params': p}, batch, train=True, rngs=rngs))[0]))(
          params)
  (loss, _), grads = jax.jit(lambda p: accumulate.value_and_grad(
      program.model, p, batch, loss_of, rngs, 4))(params)
  np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(expected))
  for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('steps, message', [
    (0, 'config.accum_steps = 0: must be an integer >= 1'),
    (3, 'that divides config.batch_size (8)'),
    (True, 'config.accum_steps = True'),
])
def test_bad_accum_steps_fail_naming_the_key(steps, message):
  config = small_config()
  config.unlock()
  config.accum_steps = steps
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(config, num_devices=1)


def test_a_micro_batch_must_split_over_the_data_parallel_devices():
  config = small_config()
  config.unlock()
  config.accum_steps = 4
  config.mesh.data = 4
  with pytest.raises(ValueError, match='each micro-batch of 2 must be divisible by the '
                                       'data-parallel size 4'):
    config_lib.validate(config, num_devices=4)
