"""Contrastive and classification losses against independent numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion import objectives
from mmfusion.objectives import contrastive
from mmfusion.objectives import fused

PAIR = (('image', 'text'),)


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


def _outputs(img, txt, scale, bias=0.0, **others):
  """Model outputs with unit embeddings of image, text and any `others` modalities."""
  to_unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  embeddings = {m: to_unit(z) for m, z in dict(image=img, text=txt, **others).items()}
  return {'embeddings': embeddings, 'logit_scale': jnp.asarray(scale),
          'logit_bias': jnp.asarray(bias)}


def softmax_loss(outputs, pairs=PAIR):
  return contrastive.softmax_contrastive(outputs, {}, pairs=pairs)


def sigmoid_loss(outputs, pairs=PAIR):
  return contrastive.sigmoid_contrastive(outputs, {}, pairs=pairs)


@pytest.mark.parametrize('seed', [0, 1])
def test_softmax_contrastive_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  with jax.enable_x64():
    loss, metrics = softmax_loss(_outputs(img, txt, 7.0))
    np.testing.assert_allclose(loss, np_clip_loss(img, txt, 7.0), rtol=1e-10)
    grad_img = jax.grad(lambda x: softmax_loss(_outputs(x, txt, 7.0))[0])(img)
  np.testing.assert_allclose(grad_img, np_grad(lambda x: np_clip_loss(x, txt, 7.0), img),
                             rtol=1e-5, atol=1e-8)
  assert 0.0 <= metrics['batch_accuracy'] <= 1.0


@pytest.mark.parametrize('seed', [0, 1])
def test_sigmoid_contrastive_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  img, txt = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  with jax.enable_x64():
    loss, _ = sigmoid_loss(_outputs(img, txt, 10.0, -10.0))
    np.testing.assert_allclose(loss, np_siglip_loss(img, txt, 10.0, -10.0), rtol=1e-10)
    f = lambda x, b: sigmoid_loss(_outputs(x, txt, 10.0, b))[0]
    grad_txt = jax.grad(lambda t: sigmoid_loss(_outputs(img, t, 10.0, -10.0))[0])(txt)
    grad_bias = jax.grad(f, argnums=1)(img, -10.0)
  np.testing.assert_allclose(grad_txt, np_grad(lambda t: np_siglip_loss(img, t, 10.0, -10.0), txt),
                             rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(
      grad_bias, np_grad(lambda b: np_siglip_loss(img, txt, 10.0, b), np.array(-10.0)), rtol=1e-5)


def test_perfectly_aligned_embeddings_give_low_softmax_loss():
  z = np.eye(4)
  loss, metrics = softmax_loss(_outputs(z, z, 100.0))
  assert loss < 1e-6 and metrics['batch_accuracy'] == 1.0


def test_classification_matches_numpy_with_smoothing():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(8, 5)), rng.integers(0, 5, size=8)
  loss, metrics = fused.classification({'classification': {'logits': jnp.asarray(logits)}},
                                       {'label': jnp.asarray(labels)}, label_smoothing=0.1)
  targets = np.full((8, 5), 0.1 / 5)
  targets[np.arange(8), labels] += 0.9
  expected = -(targets * _log_softmax(logits, 1)).sum(1).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], (logits.argmax(1) == labels).mean())


# -- several pairs ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['softmax', 'sigmoid'])
def test_several_pairs_give_the_weighted_sum_of_single_pair_losses(name):
  # ImageBind-style binding: image-text and image-audio (weight 0.5), and a pair of two
  # non-text modalities (audio-depth, weight 2), against the numpy reference of each pair.
  rng = np.random.default_rng(7)
  z = {m: rng.normal(size=(6, 4)) for m in ('image', 'text', 'audio', 'depth')}
  pairs = (('image', 'text'), ('image', 'audio', 0.5), ('audio', 'depth', 2.0))
  if name == 'softmax':
    loss_fn, ref = softmax_loss, lambda a, b: np_clip_loss(a, b, 7.0)
  else:
    loss_fn, ref = sigmoid_loss, lambda a, b: np_siglip_loss(a, b, 7.0, -3.0)
  with jax.enable_x64():
    out = _outputs(z['image'], z['text'], 7.0, -3.0, audio=z['audio'], depth=z['depth'])
    loss, metrics = loss_fn(out, pairs)
  singles = {f'{a}_{b}': ref(z[a], z[b]) for a, b, *_ in pairs}
  np.testing.assert_allclose(
      loss, singles['image_text'] + 0.5 * singles['image_audio'] + 2.0 * singles['audio_depth'],
      rtol=1e-10)
  np.testing.assert_allclose(metrics['loss'], loss)
  for key, want in singles.items():
    np.testing.assert_allclose(metrics[f'{key}/loss'], want, rtol=1e-10)
  # batch_accuracy is the mean over pairs of each pair's row-wise argmax accuracy.
  bias = -3.0 if name == 'sigmoid' else 0.0
  accuracy = {f'{a}_{b}': np.mean(np.argmax(7.0 * _unit(z[a]) @ _unit(z[b]).T + bias, 1)
                                   == np.arange(6)) for a, b, *_ in pairs}
  for key, want in accuracy.items():
    np.testing.assert_allclose(metrics[f'{key}/batch_accuracy'], want)
  np.testing.assert_allclose(metrics['batch_accuracy'], np.mean(list(accuracy.values())))


def test_one_pair_reports_no_per_pair_metrics():
  rng = np.random.default_rng(8)
  out = _outputs(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 5.0)
  _, metrics = softmax_loss(out)
  assert set(metrics) == {'loss', 'batch_accuracy', 'logit_scale'}
  # The pair's order does not matter to CLIP's symmetric loss.
  np.testing.assert_allclose(softmax_loss(out, (('text', 'image'),))[0], metrics['loss'],
                             rtol=1e-6)


@pytest.mark.parametrize('pairs', [
    (), 'image', (('image',),), (('image', 'image'),), (('image', 'text', -1.0),),
    (('image', 'text', True),), (('image', 'text', 1.0, 2.0),),
])
def test_malformed_pairs_are_rejected(pairs):
  with pytest.raises(ValueError, match='pairs'):
    contrastive.parse_pairs(pairs)


def test_total_loss_weights_and_names():
  rng = np.random.default_rng(0)
  out = _outputs(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 5.0, -2.0)
  cfg = {'softmax_contrastive': {'weight': 0.25, 'pairs': PAIR},
         'sigmoid_contrastive': {'weight': 2.0, 'pairs': PAIR}}
  total, metrics = objectives.total_loss(cfg, out, {})
  a, _ = softmax_loss(out)
  b, _ = sigmoid_loss(out)
  np.testing.assert_allclose(total, 0.25 * a + 2.0 * b, rtol=1e-6)
  assert 'softmax_contrastive/loss' in metrics and 'sigmoid_contrastive/loss' in metrics


def test_check_names_unknown_objective_and_missing_head():
  abstract = {'embeddings': {'image': 0, 'text': 0}, 'logit_scale': 0, 'logit_bias': 0}
  with pytest.raises(ValueError, match='unknown objective.*known'):
    objectives.check_config({'clipp': {'weight': 1.0}})
  with pytest.raises(ValueError, match=r"classification needs model outputs "
                                       r"\['classification/logits'\]"):
    objectives.check_outputs({'classification': {'weight': 1.0}}, abstract, {'label'})
  cfg = {'softmax_contrastive': {'weight': 1.0, 'pairs': PAIR}}
  objectives.check_config(cfg)
  objectives.check_outputs(cfg, abstract, set())


def test_check_names_the_pairs_a_contrastive_objective_reads():
  abstract = {'embeddings': {'image': 0, 'text': 0}, 'logit_scale': 0, 'logit_bias': 0}
  # pairs is required, and a malformed entry names the objective.
  with pytest.raises(ValueError, match=r"config.objectives.softmax_contrastive: .*'pairs'"):
    objectives.check_config({'softmax_contrastive': {'weight': 1.0}})
  with pytest.raises(ValueError, match=r'config.objectives.sigmoid_contrastive: pairs entry'):
    objectives.check_config({'sigmoid_contrastive': {'pairs': (('image', 'image'),)}})
  # A modality without a tower (no embedding) is missing from the outputs; so is the bias
  # that only the sigmoid loss reads.
  cfg = {'softmax_contrastive': {'pairs': (('image', 'text'), ('image', 'audio'))}}
  objectives.check_config(cfg)
  with pytest.raises(ValueError, match=r"softmax_contrastive needs model outputs "
                                       r"\['embeddings/audio'\].*config.model.towers"):
    objectives.check_outputs(cfg, abstract, set())
  no_bias = {k: v for k, v in abstract.items() if k != 'logit_bias'}
  objectives.check_outputs({'softmax_contrastive': {'pairs': PAIR}}, no_bias, set())
  with pytest.raises(ValueError, match=r"\['logit_bias'\]"):
    objectives.check_outputs({'sigmoid_contrastive': {'pairs': PAIR}}, no_bias, set())
