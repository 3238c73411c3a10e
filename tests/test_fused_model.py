"""The model with fusion heads and a caption decoder, inside the real train step: output layout,
objective weights, and start-up errors that name what to change."""
import jax
import numpy as np
import pytest

from mmfusion import config as config_lib
from mmfusion import sharding
from mmfusion import train
from mmfusion.models import fusion as fusion_lib

VOCAB = 40
PAIRS = (('image', 'text'),)
SIZES = dict(width=16, depth=2, num_heads=2, mlp_dim=32)


def fusion_config(strategy, **changes):
  """config.model.fusion for `strategy` at the test's sizes: only the keys it takes (a key
  of another strategy is an error); cross_attention has the text query the image."""
  if not strategy:
    return dict(strategy='', **changes)
  config = dict(strategy=strategy, **{k: v for k, v in SIZES.items()
                                      if k in fusion_lib.OPTIONS[strategy]})
  if strategy == 'cross_attention':
    config.update(query='text', context='image')
  return {**config, **changes}


def fused_config(objectives, strategy='cross_attention', heads=None, fusion=None):
  """A tiny fused model's config; `fusion` changes keys of the strategy's config."""
  config = config_lib.base()
  config.batch_size = 8
  config.data.image_size = 16
  config.data.inputs = ('image', 'text', 'question')
  config.tokenizer.max_len = 8
  config.model.embed_dim = 16
  config.model.towers.image.update(patch_size=8, width=16, depth=1, mlp_dim=32, num_heads=2)
  config.model.towers.text.update(width=16, depth=1, mlp_dim=32, num_heads=2, causal=False,
                                  pool='cls')
  config.model.fusion = fusion_config(strategy, **(fusion or {}))
  config.model.heads = heads or {}
  config.model.attention = 'xla'
  config.objectives = objectives
  config.optim.warmup_steps = 0
  config.evals = {}
  return config_lib.lock(config)


def batch_for(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s, l = config.batch_size, config.data.image_size, config.tokenizer.max_len

  def texts():
    lengths = rng.integers(3, l + 1, b)
    mask = np.arange(l)[None] < lengths[:, None]
    ids = np.where(mask, rng.integers(4, VOCAB, (b, l)), 0)
    ids[np.arange(b), lengths - 1] = 3
    return ids.astype(np.int32), mask
  text, text_mask = texts()
  question, question_mask = texts()
  return {'image': rng.normal(size=(b, s, s, 3)).astype(np.float32), 'text': text,
          'text_mask': text_mask, 'question': question, 'question_mask': question_mask,
          'answer': rng.integers(0, 5, b).astype(np.int32)}


def program_for(config):
  mesh = sharding.make_mesh({'data': -1}, devices=jax.devices()[:1])
  return train.TrainProgram(config, VOCAB, mesh)


ALL = {'softmax_contrastive': dict(weight=1.0, pairs=PAIRS), 'itm': dict(weight=1.0),
       'mlm': dict(weight=1.0), 'vqa': dict(weight=1.0), 'captioning': dict(weight=1.0)}
VQA = dict(answers=5, question='text', context='image')
ALL_HEADS = {'itm': dict(pair=('image', 'text')), 'mlm': dict(modality='text', context='image'),
             'vqa': VQA,
             'caption': dict(target='text', context='image', width=16, depth=1, mlp_dim=32,
                             num_heads=2, max_len=8)}


@pytest.fixture(scope='module')
def every_head():
  """Every head and objective, ITM at weight 0 (one program for the two tests below)."""
  config = fused_config(dict(ALL, itm=dict(weight=0.0)), heads=ALL_HEADS)
  return program_for(config), config


def test_every_fused_output_has_its_layout(every_head):
  program, config = every_head
  params = program.init_state(0).params
  assert {'fusion', 'itm', 'vqa', 'mlm', 'caption'} <= set(params)
  # Each head's params under its name, its layer's own name inside.
  assert set(params['itm']) == {'classifier'} and set(params['vqa']) == {'classifier'}
  assert set(params['mlm']) == {'vocab'} and set(params['caption']) == {'decoder'}
  assert params['vqa']['classifier']['head']['kernel'].shape == (16, 5)
  assert params['mlm']['vocab']['kernel'].shape == (16, VOCAB)
  assert params['text']['token_embedding']['embedding'].shape[0] == VOCAB + 1   # + [MASK]
  batch = batch_for(config)
  rngs = {'dropout': jax.random.key(1), 'sample': jax.random.key(2), 'mask': jax.random.key(3)}
  apply = jax.jit(lambda p, b, train: program.model.apply({'params': p}, b, train=train,
                                                          rngs=rngs), static_argnums=2)
  out = apply(params, batch, True)
  b, l = batch['text'].shape
  assert out['itm']['logits'].shape == (3 * b, 2)
  np.testing.assert_array_equal(out['itm']['labels'], [1] * b + [0] * (2 * b))
  assert out['mlm']['logits'].shape == (b, l, VOCAB)
  weights = np.asarray(out['mlm']['weights'])
  assert weights.sum() >= b and np.all(weights <= batch['text_mask'])   # only real tokens masked
  assert out['vqa']['logits'].shape == (b, 5)
  assert out['caption']['logits'].shape == (b, l, VOCAB)
  np.testing.assert_array_equal(out['caption']['targets'], batch['text'])
  # Evaluation mode: positives only, nothing masked.
  out = apply(params, batch, False)
  assert out['itm']['logits'].shape == (b, 2) and float(out['mlm']['weights'].sum()) == 0.0


def test_a_zero_weight_leaves_its_head_unchanged(every_head):
  """itm at weight 0: its head gets no gradient (and no weight decay: zero-init kernels and
  biases stay exactly 0); the heads of the weighted objectives move."""
  program, config = every_head
  state = program.init_state(0)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = program.train_step(state, program_batch(program, config))
  after = jax.tree.map(np.asarray, state.params)
  for leaf_before, leaf_after in zip(jax.tree.leaves(before['itm']),
                                     jax.tree.leaves(after['itm'])):
    np.testing.assert_array_equal(leaf_after, leaf_before)
  for head in ('vqa', 'mlm', 'caption'):
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[head]),
                                                      jax.tree.leaves(after[head]))]
    assert any(moved), head
  assert float(metrics['itm/weight']) == 0.0 and np.isfinite(float(metrics['loss']))


def program_batch(program, config):
  batch = batch_for(config)
  return jax.device_put(batch, program.batch_sharding)


def test_ramped_weight_grows_with_the_step():
  config = fused_config({'softmax_contrastive': dict(weight=2.0, ramp_steps=4, pairs=PAIRS)},
                        strategy='')
  program = program_for(config)
  state = program.init_state(0)
  weights = []
  for _ in range(3):
    state, metrics = program.train_step(state, program_batch(program, config))
    weights.append(float(metrics['softmax_contrastive/weight']))
  assert weights == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize('objectives, strategy, message', [
    ({'itm': dict(weight=1.0)}, 'cross_attention',
     r"config.objectives.itm needs model outputs \['itm/logits', 'itm/labels'\], which the model "
     r'does not produce: its head is set by config.model.heads.itm'),
    ({'captioning': dict(weight=1.0)}, 'cross_attention',
     r'config.objectives.captioning needs .* its head is set by config.model.heads.caption'),
    ({'vqa': dict(weight=1.0)}, '',
     r'config.model.heads.vqa runs on fused features, but config.model.fusion.strategy is empty'),
])
def test_an_objective_without_its_head_fails_naming_both(objectives, strategy, message):
  heads = {'vqa': VQA} if 'vqa' in objectives else {}
  with pytest.raises(ValueError, match=message):
    program_for(fused_config(objectives, strategy, heads=heads))


def classifying(modality, inputs, strategy, **fusion):
  """A config whose only objective is classification of `modality`, with `inputs`: no
  contrastive pair to name a modality the batch lacks before the fusion does."""
  config = fused_config({'classification': dict(weight=1.0)}, strategy, fusion=fusion,
                        heads={'classification': dict(num_classes=3, input=modality)})
  config.unlock()
  config.data.inputs = inputs
  return config_lib.lock(config)


def test_a_fusion_modality_the_batch_lacks_fails_naming_both():
  # A modality with no tower at all fails when the model is built.
  config = fused_config({'softmax_contrastive': dict(weight=1.0, pairs=PAIRS)},
                        fusion={'query': 'audio'})
  with pytest.raises(ValueError, match=r"config.model.fusion.query = 'audio': no such tower in "
                                       r"config.model.towers \(it has \['image', 'text'\]\)"):
    config_lib.validate(config, num_devices=1)
  # A tower the batch brings nothing for fails naming the input list.
  config = classifying('image', ('image', 'label'), 'cross_attention')
  with pytest.raises(ValueError, match=r"config.model.fusion.query = 'text' names a modality "
                                       r"the batch lacks: config.data.inputs = .* brings "
                                       r"\['image'\]"):
    config_lib.validate(config, num_devices=1)
  config = classifying('text', ('text', 'label'), 'early')
  with pytest.raises(ValueError, match=r"config.model.fusion.strategy = 'early' fuses "
                                       r"modalities, but config.data.inputs = .* brings only "
                                       r"\['text'\]"):
    config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize('strategy', ['cross_attention', 'co_attention', 'early', 'bottleneck',
                                      'weighted_sum', 'late'])
def test_every_fusion_strategy_learns_through_the_train_step(strategy):
  """VQA through each strategy fits a fixed batch: the loss falls well below chance (log 5)
  within 40 steps, so gradients reach the fusion, its head and the towers."""
  config = fused_config({'vqa': dict(weight=1.0)}, strategy, heads={'vqa': VQA})
  config.unlock()
  config.optim.lr = 3e-3
  config.optim.weight_decay = 0.0
  config.lock()
  program = program_for(config)
  state, batch = program.init_state(0), program_batch(program, config)
  losses = []
  for _ in range(40):
    state, metrics = program.train_step(state, batch)
    losses.append(float(metrics['vqa/loss']))
  assert losses[0] == pytest.approx(np.log(5), rel=1e-3)   # zero-init head: uniform answers
  assert losses[-1] < 0.25 * np.log(5), losses[::8]
