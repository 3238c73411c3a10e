"""The jitted train step as the trainer and the benchmarks run it: no hidden host transfers,
donated state, and the same numbers with every speed feature switched on."""
import functools

import jax
import numpy as np
import pytest

from configs import benchmark
from mmfusion import sharding
from mmfusion import train
from mmfusion.models import layout


def small_config(arg=''):
  config = benchmark.get_config('tiny,depth=2,batch=8' + (',' + arg if arg else ''))
  config.unlock()
  config.data.image_size = 16
  config.tokenizer.max_len = 8
  config.tokenizer.vocab_size = 64
  for tower in ('image', 'text'):
    config.model.towers[tower].update(width=32, mlp_dim=64, num_heads=2)
  config.model.embed_dim = 16
  config.lock()
  return config


def synthetic_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s, l = config.batch_size, config.data.image_size, config.tokenizer.max_len
  lengths = rng.integers(2, l + 1, b)
  mask = np.arange(l)[None] < lengths[:, None]
  text = np.where(mask, rng.integers(4, config.tokenizer.vocab_size, (b, l)), 0)
  text[np.arange(b), lengths - 1] = 3   # EOS last
  return {'image': rng.normal(size=(b, s, s, 3)).astype(np.float32),
          'text': text.astype(np.int32), 'text_mask': mask}


def program_and_batch(config):
  program = train.TrainProgram(config, config.tokenizer.vocab_size, sharding.make_mesh(config.mesh))
  batch = jax.device_put(synthetic_batch(config), program.batch_sharding)
  return program, batch


def test_step_has_no_implicit_transfers_and_donates_the_state():
  program, batch = program_and_batch(small_config())
  state = program.init_state(0)
  old_leaf = jax.tree.leaves(state.params)[0]
  # Any implicit host<->device copy inside the loop (a Python scalar, a numpy array, a
  # `float(metric)`) would raise here; the metrics stay on device until the log step.
  with jax.transfer_guard('disallow'):
    for _ in range(2):
      state, metrics = program.train_step(state, batch)
  assert old_leaf.is_deleted()     # the state buffers were donated to the step
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))


def three_step_losses(config):
  """Losses of three train steps on the synthetic batch, from the unrolled model's init."""
  program, batch = program_and_batch(config)
  state = program.init_state(0)
  if config.model.scan_layers:   # start from the unrolled model's exact params
    reference = train.TrainProgram(small_config(), config.tokenizer.vocab_size, program.mesh)
    unrolled = reference.init_state(0)
    stacked = jax.device_put(layout.scan_layout(jax.device_get(unrolled.params)),
                             program.state_shardings.params)
    state = state.replace(params=stacked, opt_state=program.tx.init(stacked))
  out = []
  for _ in range(3):
    state, metrics = program.train_step(state, batch)
    out.append(float(metrics['loss']))
  return out


@functools.cache
def plain_losses():
  return three_step_losses(small_config())


@pytest.mark.parametrize('arg', ['scan', 'remat=full', 'scan,remat=save_dots'])
def test_speed_features_give_the_same_training_trajectory(arg):
  """Three steps with a feature on match three steps without it (same init, same data)."""
  np.testing.assert_allclose(three_step_losses(small_config(arg)), plain_losses(), rtol=2e-5)
