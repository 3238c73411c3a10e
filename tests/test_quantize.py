"""int8 weight quantisation (mmfusion/quantize.py): per-output-channel scales checked against a
hand computation, a scale per layer in scanned stacks, what stays float, the bytes, and an int8
checkpoint read back dequantised by checkpoint.load_params. Quantised training
(config.model.quantize='int8', AQT): the same parameters, int8 matmuls, outputs close to float,
and it learns."""
import re

import numpy as np
import pytest

from mmfusion import checkpoint as ckpt
from mmfusion import quantize


def test_each_output_channel_has_its_own_scale_and_rounds_to_nearest():
  w = np.array([[1.0, -0.02, 0.0], [-2.54, 0.015, 0.0]], np.float32)    # [in 2, out 3]
  q, scales = quantize.quantize({'dense': {'kernel': w}})
  kernel, scale = q['dense']['kernel'], scales['dense']['kernel']
  assert kernel.dtype == np.int8 and scale.shape == (1, 3)
  np.testing.assert_allclose(scale[0], [2.54 / 127, 0.02 / 127, 1.0])   # an all-zero column: 1
  np.testing.assert_array_equal(kernel, [[50, -127, 0], [-127, 95, 0]])  # round(w / s)
  back = quantize.dequantize(q, scales)['dense']['kernel']
  assert np.all(np.abs(back - w) <= scale / 2 + 1e-7)
  assert back[0, 2] == 0.0 and back[1, 2] == 0.0                        # zero stays zero


def test_vectors_scalars_and_integers_stay_as_they_are():
  params = {'bias': np.ones(4, np.float32), 'scale': np.float32(2.0),
            'ids': np.arange(6, dtype=np.int32).reshape(2, 3)}
  q, scales = quantize.quantize(params)
  assert scales == {} and q['bias'].dtype == np.float32 and q['ids'].dtype == np.int32


def test_a_scanned_stack_keeps_a_scale_per_layer():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 8, 4)).astype(np.float32) * np.array([1, 10, 100])[:, None, None]
  q, scales = quantize.quantize({'kernel': w}, {'kernel': ('layers', 'embed', 'mlp')})
  assert scales['kernel'].shape == (3, 1, 4)
  np.testing.assert_allclose(scales['kernel'], np.abs(w).max(axis=1, keepdims=True) / 127,
                             rtol=1e-6)
  back = quantize.dequantize(q, scales)['kernel']
  # Each layer's error is bounded by its own scale, not the largest layer's.
  assert np.abs(back[0] - w[0]).max() <= scales['kernel'][0].max() / 2 + 1e-7


def test_int8_takes_a_quarter_of_the_bytes():
  w = np.random.default_rng(0).normal(size=(256, 512)).astype(np.float32)
  q, scales = quantize.quantize({'kernel': w, 'bias': np.zeros(512, np.float32)})
  ratio = (quantize.nbytes(q) + quantize.nbytes(scales)) / (w.nbytes + 512 * 4)
  assert 0.25 < ratio < 0.26


def test_an_int8_checkpoint_loads_back_dequantised(tmp_path):
  rng = np.random.default_rng(0)
  params = {'image': {'kernel': rng.normal(size=(8, 4)).astype(np.float32),
                      'bias': rng.normal(size=4).astype(np.float32)},
            'logit_scale': np.float32(2.5)}
  q, scales = quantize.quantize(params)
  checkpointer = ckpt.Checkpointer(str(tmp_path), max_to_keep=1, async_save=False)
  checkpointer.save(7, {'params': q, quantize.SCALES: scales}, {'step': 7})
  checkpointer.wait()
  checkpointer.close()
  loaded = ckpt.load_params(str(tmp_path))
  expected = quantize.dequantize(q, scales)
  for path, value in ckpt.flatten(expected).items():
    np.testing.assert_array_equal(ckpt.flatten(loaded)[path], value, err_msg=path)
    assert ckpt.flatten(loaded)[path].dtype == np.float32
  np.testing.assert_array_equal(ckpt.load_params(str(tmp_path), 'image')['kernel'],
                                expected['image']['kernel'])
  with pytest.raises(ckpt.CheckpointError, match="no sub-tree 'text'"):
    ckpt.load_params(str(tmp_path), 'text')


def _int8_programs():
  import jax
  from test_train_program import program_and_batch, small_config
  out = []
  for kind in ('', 'int8'):
    config = small_config()
    config.unlock()
    config.model.quantize = kind
    config.optim.warmup_steps = 0
    config.lock()
    out.append(program_and_batch(config))
  return jax, out


def test_int8_training_has_the_same_params_int8_matmuls_and_learns():
  pytest.importorskip('aqt', reason="Google's AQT (aqtp) is not installed")
  jax, ((fp, batch), (qp, _)) = _int8_programs()
  params = fp.init_state(0).params
  assert jax.tree.structure(qp.init_state(0).params) == jax.tree.structure(params)
  apply_f = jax.jit(lambda p: fp.model.apply({'params': p}, batch))
  apply_q = jax.jit(lambda p: qp.model.apply({'params': p}, batch))
  assert re.search(r'xi8>', apply_q.lower(params).as_text())      # int8 operands in the HLO
  assert not re.search(r'xi8>', apply_f.lower(params).as_text())
  for m, z in apply_f(params)['embeddings'].items():
    cosine = np.sum(np.asarray(z) * np.asarray(apply_q(params)['embeddings'][m]), axis=-1)
    assert cosine.min() > 0.99, (m, cosine.min())
  state, losses = qp.init_state(0), []
  for _ in range(6):
    state, metrics = qp.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


def test_an_unknown_quantize_value_fails_naming_the_key():
  from mmfusion import config as config_lib
  from test_train_program import small_config
  config = small_config()
  config.unlock()
  config.model.quantize = 'int4'
  with pytest.raises(ValueError, match=re.escape("config.model.quantize = 'int4'; expected one "
                                                 "of ('', 'int8')")):
    config_lib.validate(config, num_devices=1)
