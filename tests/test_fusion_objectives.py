"""The fused-task objectives (itm, mlm, captioning, vqa) against numpy cross-entropies, and the
objective weights' ramp-up schedule and its config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfusion import objectives
from mmfusion.objectives import fused


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_ce(logits, labels, smoothing=0.0):
  """-log p(label), with label smoothing as optax.smooth_labels defines it."""
  v = logits.shape[-1]
  target = np.eye(v)[labels] * (1 - smoothing) + smoothing / v
  return -(target * _log_softmax(logits)).sum(-1)


def _token_outputs(rng, b=3, l=5, v=7, weights=None):
  logits = rng.normal(size=(b, l, v)).astype(np.float32) * 2
  targets = rng.integers(0, v, size=(b, l)).astype(np.int32)
  # Make some predictions right, so accuracy is neither 0 nor 1 by chance alone.
  targets[:, ::2] = logits[:, ::2].argmax(-1)
  if weights is None:
    weights = (rng.random((b, l)) < 0.5).astype(np.float32)
  return logits, targets, weights


def test_itm_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(9, 2)).astype(np.float32)
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0], np.int32)
  loss, metrics = fused.itm({'itm': {'logits': jnp.asarray(logits),
                                     'labels': jnp.asarray(labels)}}, {})
  np.testing.assert_allclose(loss, _np_ce(logits, labels).mean(), rtol=1e-5)
  correct = logits.argmax(-1) == labels
  assert set(metrics) == {'loss', 'accuracy', 'positive_accuracy', 'negative_accuracy'}
  np.testing.assert_allclose(metrics['accuracy'], correct.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['positive_accuracy'], correct[:3].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['negative_accuracy'], correct[3:].mean(), rtol=1e-6)


def test_itm_with_only_positives_has_finite_metrics():
  out = {'itm': {'logits': jnp.array([[0.0, 2.0], [1.0, 0.0]]), 'labels': jnp.ones(2, jnp.int32)}}
  _, metrics = fused.itm(out, {})
  assert metrics['positive_accuracy'] == 0.5 and metrics['negative_accuracy'] == 0.0


def test_mlm_matches_numpy():
  rng = np.random.default_rng(1)
  logits, targets, weights = _token_outputs(rng)
  out = {'mlm': {'logits': jnp.asarray(logits), 'targets': jnp.asarray(targets),
                 'weights': jnp.asarray(weights)}}
  loss, metrics = fused.mlm(out, {})
  ce = _np_ce(logits, targets)
  np.testing.assert_allclose(loss, (weights * ce).sum() / weights.sum(), rtol=1e-5)
  assert set(metrics) == {'loss', 'accuracy', 'num_masked'}
  correct = logits.argmax(-1) == targets
  np.testing.assert_allclose(metrics['accuracy'], correct[weights > 0].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['num_masked'], weights.sum() / len(weights), rtol=1e-6)


def test_mlm_with_nothing_masked_is_zero_not_nan():
  logits, targets, _ = _token_outputs(np.random.default_rng(2))
  out = {'mlm': {'logits': jnp.asarray(logits), 'targets': jnp.asarray(targets),
                 'weights': jnp.zeros(targets.shape)}}
  loss, metrics = fused.mlm(out, {})
  assert loss == 0.0 and metrics['accuracy'] == 0.0 and metrics['num_masked'] == 0.0
  grad = jax.grad(lambda x: fused.mlm({'mlm': dict(out['mlm'], logits=x)}, {})[0])(
      out['mlm']['logits'])
  assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_captioning_matches_numpy(smoothing):
  rng = np.random.default_rng(3)
  lengths = np.array([5, 2, 4])
  weights = (np.arange(5)[None] < lengths[:, None]).astype(np.float32)   # the text mask
  logits, targets, weights = _token_outputs(rng, weights=weights)
  out = {'caption': {'logits': jnp.asarray(logits), 'targets': jnp.asarray(targets),
                     'weights': jnp.asarray(weights)}}
  loss, metrics = fused.captioning(out, {}, label_smoothing=smoothing)
  m = weights > 0
  np.testing.assert_allclose(loss, _np_ce(logits, targets, smoothing)[m].mean(), rtol=1e-5)
  assert set(metrics) == {'loss', 'accuracy', 'perplexity'}
  np.testing.assert_allclose(metrics['accuracy'], (logits.argmax(-1) == targets)[m].mean(),
                             rtol=1e-6)
  # Perplexity of the model's distribution: the unsmoothed NLL, whatever the smoothing.
  np.testing.assert_allclose(metrics['perplexity'], np.exp(_np_ce(logits, targets)[m].mean()),
                             rtol=1e-5)


def test_vqa_matches_numpy_and_leaves_out_unknown_answers():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  answers = np.array([0, 4, -1, 2, -1, 1], np.int32)
  answers[[0, 3]] = logits[[0, 3]].argmax(-1)
  loss, metrics = fused.vqa({'vqa': {'logits': jnp.asarray(logits)}},
                            {'answer': jnp.asarray(answers)})
  known = answers >= 0
  np.testing.assert_allclose(loss, _np_ce(logits[known], answers[known]).mean(), rtol=1e-5)
  assert set(metrics) == {'loss', 'accuracy', 'unknown_answers'}
  np.testing.assert_allclose(metrics['accuracy'],
                             (logits[known].argmax(-1) == answers[known]).mean(), rtol=1e-6)
  assert metrics['unknown_answers'] == 2
  # An unknown answer's logits get no gradient.
  loss_of = lambda x: fused.vqa({'vqa': {'logits': x}}, {'answer': jnp.asarray(answers)})[0]
  grad = jax.grad(loss_of)(jnp.asarray(logits))
  np.testing.assert_array_equal(grad[~known], 0.0)
  assert np.all(np.abs(grad[known]).sum(-1) > 0)


def test_vqa_with_only_unknown_answers_is_zero():
  loss, metrics = fused.vqa({'vqa': {'logits': jnp.ones((3, 4))}},
                            {'answer': -jnp.ones(3, jnp.int32)})
  assert loss == 0.0 and metrics['unknown_answers'] == 3


# -- weights and their schedule ---------------------------------------------------------------

def _vqa_case():
  rng = np.random.default_rng(5)
  out = {'vqa': {'logits': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
         'itm': {'logits': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
                 'labels': jnp.array([1, 1, 0, 0], jnp.int32)}}
  return out, {'answer': jnp.array([0, 1, 2, -1], jnp.int32)}


@pytest.mark.parametrize('step,fraction', [(0, 0.0), (50, 0.5), (100, 1.0), (1000, 1.0)])
def test_ramp_up_of_the_weight(step, fraction):
  out, batch = _vqa_case()
  cfg = {'vqa': {'weight': 2.0, 'ramp_steps': 100}, 'itm': {'weight': 0.5}}
  vqa_loss, _ = fused.vqa(out, batch)
  itm_loss, _ = fused.itm(out, batch)
  total, metrics = objectives.total_loss(cfg, out, batch, step=jnp.asarray(step, jnp.int32))
  np.testing.assert_allclose(metrics['vqa/weight'], 2.0 * fraction, rtol=1e-6)
  np.testing.assert_allclose(metrics['itm/weight'], 0.5, rtol=1e-6)    # no ramp: constant
  np.testing.assert_allclose(total, 2.0 * fraction * vqa_loss + 0.5 * itm_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], total)
  assert {'vqa/loss', 'vqa/accuracy', 'vqa/unknown_answers', 'itm/loss',
          'itm/positive_accuracy'} <= set(metrics)


def test_ramp_under_jit_and_without_a_step():
  out, batch = _vqa_case()
  cfg = {'vqa': {'weight': 3.0, 'ramp_steps': 10}}
  weight_at = jax.jit(lambda s: objectives.total_loss(cfg, out, batch, step=s)[1]['vqa/weight'])
  np.testing.assert_allclose([weight_at(s) for s in (0, 3, 10, 11)], [0.0, 0.9, 3.0, 3.0],
                             rtol=1e-6)
  # Outside training (and the callers that pass no step): the full weight.
  _, metrics = objectives.total_loss(cfg, out, batch)
  np.testing.assert_allclose(metrics['vqa/weight'], 3.0)


@pytest.mark.parametrize('cfg,match', [
    ({'weight': 1.0, 'ramp_steps': -1}, r'vqa\.ramp_steps = -1'),
    ({'weight': 1.0, 'ramp_steps': 2.5}, r'vqa\.ramp_steps = 2\.5'),
    ({'weight': 1.0, 'ramp_steps': True}, r'vqa\.ramp_steps = True'),
    ({'weight': -0.5}, r'vqa\.weight = -0\.5'),
    ({'weight': '1'}, r"vqa\.weight = '1'"),
    ({'weight': float('nan')}, r'vqa\.weight = nan'),
])
def test_check_rejects_bad_weight_and_ramp(cfg, match):
  # Weights and ramps are static config: checked without a model.
  with pytest.raises(ValueError, match=match):
    objectives.check_config({'vqa': cfg})


def test_check_accepts_the_fused_objectives():
  abstract = {'itm': {'logits': 0, 'labels': 0}, 'vqa': {'logits': 0},
              'mlm': {'logits': 0, 'targets': 0, 'weights': 0},
              'caption': {'logits': 0, 'targets': 0, 'weights': 0}}
  cfg = {'itm': {'weight': 1}, 'mlm': {'weight': 1.0, 'ramp_steps': 0},
         'captioning': {'weight': 0.5, 'ramp_steps': 100, 'label_smoothing': 0.1},
         'vqa': {'weight': 1.0, 'ramp_steps': np.int64(5)}}
  objectives.check_config(cfg)
  objectives.check_outputs(cfg, abstract, {'answer'})
  with pytest.raises(ValueError, match=r"needs batch keys \['answer'\]"):
    objectives.check_outputs({'vqa': {'weight': 1.0}}, abstract, set())
  with pytest.raises(ValueError, match=r"captioning needs model outputs \['caption/logits'.*"
                                       r'its head is set by config.model.heads.caption'):
    objectives.check_outputs({'captioning': {'weight': 1.0}}, {'vqa': {'logits': 0}}, set())
  # An argument the objective does not take is caught with the static checks.
  with pytest.raises(ValueError, match=r'config.objectives.captioning: .*smoothing'):
    objectives.check_config({'captioning': {'weight': 1.0, 'smoothing': 0.1}})
