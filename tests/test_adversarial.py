"""Adversarial training (mmfusion/adversarial.py) and the robustness evaluator: PGD stays in its
ball and finds the hand-computed optimum of a linear loss, the pixel attack raises the training
loss, FreeLB with a vanishing ball is the clean gradient and VILLA's KL is reported, the
evaluator's clean accuracy is the zero-shot evaluator's and attacks only lower it, and bad
settings fail naming the key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shared_runs
from mmfusion import adversarial
from mmfusion import api
from mmfusion import config as config_lib
from mmfusion import objectives
from mmfusion import train
from mmfusion.evals import robustness
from mmfusion.evals.zeroshot import ZeroShot
from test_train_program import program_and_batch, small_config


def test_pgd_finds_the_linear_optimum_and_stays_in_its_ball():
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(0, 1, (4, 5, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 5, 3)), jnp.float32)
  eps = 4 / 255
  # From a random start anywhere in the ball, 8 steps of eps / 4 reach its far side.
  adv, fooled = adversarial.pgd_linf(lambda x: jnp.sum(x * w), x0, eps, eps / 4, 8,
                                     jax.random.key(0), failed=lambda x: jnp.zeros(4, bool))
  want = np.clip(np.asarray(x0) + eps * np.sign(np.asarray(w)), 0, 1)   # the L-inf optimum
  np.testing.assert_allclose(adv, want, atol=1e-6)
  assert not np.any(fooled)
  # A loss that pulls outside [0, 1]: the iterate stays in the box and in the ball.
  adv, _ = adversarial.pgd_linf(lambda x: jnp.sum(x), x0, 0.5, 0.1, 10, jax.random.key(1))
  assert np.all(adv <= 1) and np.all(np.abs(adv - x0) <= 0.5 + 1e-6)


def _uniform_images(batch, seed=1):
  images = np.random.default_rng(seed).uniform(-1, 1, batch['image'].shape).astype(np.float32)
  return {**batch, 'image': jax.device_put(images, batch['image'].sharding)}


def _config(**adv):
  config = small_config()
  config.unlock()
  config.adversarial.update(adv)
  config.lock()
  return config


def test_the_pixel_attack_raises_the_training_loss_within_eps():
  program, batch = program_and_batch(_config(type='pgd', eps=8.0, step_size=2.0, steps=4,
                                             clean_weight=0.25))
  batch = _uniform_images(batch)
  params = program.init_state(0).params
  config = program.config

  def loss(b):
    out = program.model.apply({'params': params}, b, train=True)
    return objectives.total_loss(config.objectives, out, b)[0]

  adv = jax.jit(lambda b: adversarial.perturb_pixels(
      config.adversarial, jnp.float32(0.5), jnp.float32(0.5), loss, b, jax.random.key(0)))(batch)
  moved = np.abs(np.asarray(adv['image']) - np.asarray(batch['image'])) * 0.5    # in [0, 1] units
  assert moved.max() <= 8 / 255 + 1e-6 and moved.max() > 4 / 255
  assert float(loss(adv)) > float(loss(batch)) + 1e-3
  # The step: the loss is the mix of the attacked and the clean batch's, the attacked higher.
  state, m = program.train_step(program.init_state(0), batch)
  attacked, clean = float(m['adversarial/loss']), float(m['adversarial/clean_loss'])
  assert int(state.step) == 1
  assert float(m['loss']) == pytest.approx(0.75 * attacked + 0.25 * clean, rel=1e-6)
  assert attacked > clean + 1e-3


def test_freelb_with_a_vanishing_ball_is_the_clean_gradient():
  clean, batch = program_and_batch(small_config())
  tiny, _ = program_and_batch(_config(type='freelb', eps=1e-7, step_size=1e-7, steps=2,
                                      modalities=('image', 'text')))
  big, _ = program_and_batch(_config(type='freelb', eps=3.0, step_size=1.0, steps=2,
                                     modalities=('image', 'text')))
  # Two steps (the first at the warmup's zero learning rate): params, loss and gradient norm.
  runs = {}
  for name, program in (('clean', clean), ('tiny', tiny), ('big', big)):
    state = program.init_state(0)
    for _ in range(2):
      state, metrics = program.train_step(state, batch)
    runs[name] = (jax.tree.map(np.asarray, state.params), float(metrics['loss']),
                  float(metrics['grad_norm']))
  (pa, la, ga), (pb, lb, gb), (_, lc, gc) = runs['clean'], runs['tiny'], runs['big']
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
  assert lb == pytest.approx(la, rel=1e-5) and gb == pytest.approx(ga, rel=1e-4)
  # A real ball reaches the towers: a higher loss, another gradient.
  assert lc > la + 0.1 and abs(gc - ga) > 1e-3 * ga, (la, lc, ga, gc)


def test_freelb_with_villa_kl_trains_a_fused_model():
  config = config_lib.load_file('configs/shapes_albef.py', 'smoke')
  config.unlock()
  for tower in ('image', 'text'):
    config.model.towers[tower].update(width=32, mlp_dim=64, num_heads=2, depth=1)
  config.model.fusion.update(depth=1)
  config.model.embed_dim = 16
  config.batch_size = 8
  config.data.image_size = 16
  config.tokenizer.max_len = 8
  config.tokenizer.vocab_size = 64
  config.adversarial.update(type='freelb', eps=1.0, step_size=0.3, steps=2,
                            modalities=('image', 'text'), kl_weight=1.0)
  config.lock()
  program = train.TrainProgram(config, 64, program_and_batch(small_config())[0].mesh)
  _, batch = program_and_batch(small_config())
  # The ITM classifier starts at zero, and so do both predictions; after the first step (at the
  # warmup's zero learning rate) and one update, they differ.
  state, metrics = program.train_step(program.init_state(0), batch)
  for _ in range(2):
    state, metrics = program.train_step(state, batch)
  assert float(metrics['adversarial/kl']) > 0 and np.isfinite(float(metrics['loss']))


@pytest.mark.parametrize('override, message', [
    (dict(type='fgsm'), "config.adversarial.type = 'fgsm'"),
    (dict(type='pgd', modalities=('text',)), 'must be image towers (vit)'),
    (dict(type='pgd', eps=0.0), 'config.adversarial.eps = 0.0: must be > 0'),
    (dict(type='pgd', kl_weight=1.0), "VILLA's term of type 'freelb'"),
    (dict(type='pgd', clean_weight=1.0), 'config.adversarial.clean_weight = 1.0: must be in'),
    (dict(type='freelb', modalities=('audio',)), 'name towers of config.model.towers'),
])
def test_bad_adversarial_settings_fail_naming_the_key(override, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    config_lib.validate(_config(**override))


def test_the_robustness_evaluator_agrees_with_zeroshot_and_attacks_only_lower_it():
  """On the session's small CLIP run (tests/shared_runs.py), whose zero-shot accuracy is well
  above chance. The first 64 test images (28 with one object) and short attacks: the tests'
  unoptimised XLA (tests/xla_flags.py) runs each attack step slowly."""
  run = api.load_run(shared_runs.workdir('clip'), data_dir=shared_runs.data_dir())
  built = dict(model=run.model, config=run.config, source=run.source)
  common = dict(split='test[:64]', batch_size=32, keep_if={'num_objects': 1}, modality='image',
                prompts='text', templates=('a {}.',))
  clean = dict(ZeroShot('zs', **built, **common).run(run.params))['accuracy']
  rob = robustness.Robustness('rob', **built, **common, eps=(1e-4, 16.0), steps=3, strong=True,
                              strong_steps=1, restarts=1)
  got = dict(rob.run(run.params))
  assert got['num_examples'] >= 20
  assert clean > 3 / 30 and got['clean_accuracy'] == pytest.approx(clean)   # 3x chance
  assert got['pgd3_eps0.0001'] == pytest.approx(clean, abs=1.5 / got['num_examples'])
  assert got['pgd3_eps16'] < got['clean_accuracy']
  for eps in ('0.0001', '16'):
    assert got[f'strong_eps{eps}'] <= got[f'pgd3_eps{eps}']
  with pytest.raises(ValueError, match='must be an image tower'):
    robustness.Robustness('r', **built, **{**common, 'modality': 'text'})
