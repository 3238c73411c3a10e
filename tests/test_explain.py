"""Heat-maps (mmfusion/explain.py): the relevance rules against numpy written from the papers,
and trained models whose answer depends on one patch only, where every method must point at it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmfusion import config as config_lib
from mmfusion import explain
from mmfusion.models import model as model_lib

RNG = np.random.default_rng(0)


def _attention(b, h, q, k):
  a = RNG.uniform(size=(b, h, q, k)).astype(np.float32)
  return a / a.sum(-1, keepdims=True)


def test_rollout_is_the_product_of_residual_head_means():
  attentions = [_attention(2, 3, 5, 5) for _ in range(3)]
  expected = None
  for a in attentions:
    m = 0.5 * a.mean(1) + 0.5 * np.eye(5)
    m /= m.sum(-1, keepdims=True)
    expected = m if expected is None else m @ expected
  np.testing.assert_allclose(explain.rollout([jnp.asarray(a) for a in attentions]), expected,
                             rtol=1e-5)


def test_self_relevance_follows_chefer_et_al():
  attentions = [_attention(2, 3, 4, 4) for _ in range(2)]
  grads = [RNG.normal(size=a.shape).astype(np.float32) for a in attentions]
  r = np.broadcast_to(np.eye(4), (2, 4, 4))
  for a, g in zip(attentions, grads):
    r = r + np.maximum(a * g, 0).mean(1) @ r
  np.testing.assert_allclose(explain.self_relevance(attentions, grads), r, rtol=1e-5)


def test_cross_relevance_follows_the_bimodal_rule():
  """One fusion layer: R_qk = R_bar_qq^T A_bar_cross R_bar_kk, with R_qq after self-attention."""
  a_self, a_cross = _attention(1, 2, 3, 3), _attention(1, 2, 3, 4)
  g_self, g_cross = (RNG.normal(size=x.shape).astype(np.float32) for x in (a_self, a_cross))
  r_kk = np.eye(4)[None] + RNG.uniform(size=(1, 4, 4)).astype(np.float32)

  def bar(r):
    x = r - np.eye(r.shape[-1])
    return x / np.maximum(x.sum(-1, keepdims=True), 1e-12) + np.eye(r.shape[-1])
  r_qq = np.eye(3)[None] + np.maximum(a_self * g_self, 0).mean(1) @ np.eye(3)[None]
  expected = np.swapaxes(bar(r_qq), 1, 2) @ np.maximum(a_cross * g_cross, 0).mean(1) @ bar(r_kk)
  got = explain.cross_relevance([{'self': (a_self, g_self), 'cross': (a_cross, g_cross)}],
                                jnp.asarray(r_kk))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_gradcam_weights_attention_by_positive_gradient():
  a = _attention(2, 3, 4, 6)
  g = RNG.normal(size=a.shape).astype(np.float32)
  np.testing.assert_allclose(explain.gradcam(a, g), (a * np.maximum(g, 0)).mean(1), rtol=1e-6)


# -- a model whose answer depends on one patch --------------------------------------------------

SIZE, PATCH, KEY_PATCH = 16, 4, 6          # a 4 x 4 grid; the label lives in patch 6 = (1, 2)


def _one_patch_data(n, rng):
  """Noise images in [-1, 1]; patch KEY_PATCH is a flat -0.8 or +0.8 (label 0 or 1): the label
  depends on that patch only, every other patch has the same distribution for both labels."""
  images = rng.uniform(-1, 1, size=(n, SIZE, SIZE, 3)).astype(np.float32)
  labels = rng.integers(0, 2, size=n)
  r, c = divmod(KEY_PATCH, SIZE // PATCH)
  images[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = (
      (labels * 1.6 - 0.8)[:, None, None, None] + rng.normal(0, 0.05, (n, PATCH, PATCH, 3)))
  return images, labels


@pytest.fixture(scope='module', params=['gap'])
def one_patch_model(request):
  config = config_lib.base()
  config.model.towers = dict(image=dict(type='vit', patch_size=PATCH, width=32, depth=2,
                                        mlp_dim=64, num_heads=2, pool=request.param))
  config.model.heads = dict(classification=dict(input='image', num_classes=2))
  model = model_lib.build(config.model, 0)
  rng = np.random.default_rng(1)
  params = model.init(jax.random.key(0), {'image': jnp.zeros((1, SIZE, SIZE, 3))})['params']
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, images, labels):
    def loss(p):
      logits = model.apply({'params': p}, {'image': images})['classification']['logits']
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt
  for _ in range(250):
    images, labels = _one_patch_data(64, rng)
    params, opt = step(params, opt, images, labels)
  images, labels = _one_patch_data(128, np.random.default_rng(2))
  logits = model.apply({'params': params}, {'image': images})['classification']['logits']
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  assert accuracy > 0.95, accuracy
  return config, params, request.param, images, labels


@pytest.mark.parametrize('method', ['chefer', 'rollout'])
def test_heatmaps_peak_on_the_one_patch_the_answer_depends_on(one_patch_model, method):
  config, params, pool, images, labels = one_patch_model
  sowing = model_lib.build(config.model, 0, sow_attention=True)

  def score(module, batch):   # the logit of the predicted class, as one explains a prediction
    logits = module(batch)['classification']['logits']
    return jnp.max(logits, axis=-1)
  out = explain.maps(sowing, params, {'image': jnp.asarray(images)}, score, explained='image',
                     method=method, pool=pool)
  peak = np.argmax(np.asarray(out['heatmap']), axis=-1)
  assert out['heatmap'].shape == (len(images), (SIZE // PATCH) ** 2)
  # Chance is 1/16. Every token also reaches the mean-pooled output through its own residual,
  # which the relevance keeps as an even share (measured 0.90 for chefer). With cls pooling,
  # measured 0.41 (chefer) and 0.63 (rollout) on this 2-layer toy: its cls reads the patch in
  # layer 0, where the gradient w.r.t. that attention is negative (the rule's relu drops it).
  assert np.mean(peak == KEY_PATCH) >= 0.8, (method, pool, np.bincount(peak, minlength=16))
