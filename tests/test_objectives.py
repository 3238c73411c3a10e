"""Contrastive and classification losses against independent numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion import objectives


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_clip_loss(img, txt, scale):
  logits = scale * _unit(img) @ _unit(txt).T
  n = len(logits)
  i2t = -_log_softmax(logits, 1)[np.arange(n), np.arange(n)].mean()
  t2i = -_log_softmax(logits, 0)[np.arange(n), np.arange(n)].mean()
  return (i2t + t2i) / 2


def np_siglip_loss(img, txt, scale, bias):
  logits = scale * _unit(img) @ _unit(txt).T + bias
  n = len(logits)
  labels = 2 * np.eye(n) - 1
  return np.sum(np.log1p(np.exp(-labels * logits))) / n


def np_grad(f, x, eps=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[idx] = eps
    g[idx] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


def _outputs(img, txt, scale, bias=0.0):
  to_unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return {'embeddings': {'image': to_unit(img), 'text': to_unit(txt)},
          'logit_scale': jnp.asarray(scale), 'logit_bias': jnp.asarray(bias)}


@pytest.mark.parametrize('seed', [0, 1])
def test_softmax_contrastive_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  with jax.enable_x64():
    loss, metrics = objectives.softmax_contrastive(_outputs(img, txt, 7.0), {})
    np.testing.assert_allclose(loss, np_clip_loss(img, txt, 7.0), rtol=1e-10)
    grad_img = jax.grad(lambda x: objectives.softmax_contrastive(_outputs(x, txt, 7.0), {})[0])(img)
  np.testing.assert_allclose(grad_img, np_grad(lambda x: np_clip_loss(x, txt, 7.0), img),
                             rtol=1e-5, atol=1e-8)
  assert 0.0 <= metrics['batch_accuracy'] <= 1.0


@pytest.mark.parametrize('seed', [0, 1])
def test_sigmoid_contrastive_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  img, txt = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  with jax.enable_x64():
    loss, _ = objectives.sigmoid_contrastive(_outputs(img, txt, 10.0, -10.0), {})
    np.testing.assert_allclose(loss, np_siglip_loss(img, txt, 10.0, -10.0), rtol=1e-10)
    f = lambda x, b: objectives.sigmoid_contrastive(_outputs(x, txt, 10.0, b), {})[0]
    grad_txt = jax.grad(lambda t: objectives.sigmoid_contrastive(
        _outputs(img, t, 10.0, -10.0), {})[0])(txt)
    grad_bias = jax.grad(f, argnums=1)(img, -10.0)
  np.testing.assert_allclose(grad_txt, np_grad(lambda t: np_siglip_loss(img, t, 10.0, -10.0), txt),
                             rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(
      grad_bias, np_grad(lambda b: np_siglip_loss(img, txt, 10.0, b), np.array(-10.0)), rtol=1e-5)


def test_perfectly_aligned_embeddings_give_low_softmax_loss():
  z = np.eye(4)
  loss, metrics = objectives.softmax_contrastive(_outputs(z, z, 100.0), {})
  assert loss < 1e-6 and metrics['batch_accuracy'] == 1.0


def test_classification_matches_numpy_with_smoothing():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(8, 5)), rng.integers(0, 5, size=8)
  loss, metrics = objectives.classification({'logits': jnp.asarray(logits)},
                                            {'label': jnp.asarray(labels)}, label_smoothing=0.1)
  targets = np.full((8, 5), 0.1 / 5)
  targets[np.arange(8), labels] += 0.9
  expected = -(targets * _log_softmax(logits, 1)).sum(1).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], (logits.argmax(1) == labels).mean())


def test_total_loss_weights_and_names():
  rng = np.random.default_rng(0)
  out = _outputs(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 5.0, -2.0)
  cfg = {'softmax_contrastive': {'weight': 0.25}, 'sigmoid_contrastive': {'weight': 2.0}}
  total, metrics = objectives.total_loss(cfg, out, {})
  a, _ = objectives.softmax_contrastive(out, {})
  b, _ = objectives.sigmoid_contrastive(out, {})
  np.testing.assert_allclose(total, 0.25 * a + 2.0 * b, rtol=1e-6)
  assert 'softmax_contrastive/loss' in metrics and 'sigmoid_contrastive/loss' in metrics


def test_check_names_unknown_objective_and_missing_head():
  abstract = {'embeddings': {'image': 0, 'text': 0}, 'logit_scale': 0, 'logit_bias': 0}
  with pytest.raises(ValueError, match='unknown objective.*known'):
    objectives.check({'clipp': {'weight': 1.0}}, abstract, {'image'})
  with pytest.raises(ValueError, match=r"classification needs model outputs \['logits'\]"):
    objectives.check({'classification': {'weight': 1.0}}, abstract, {'label'})
  objectives.check({'softmax_contrastive': {'weight': 1.0}}, abstract, set())
