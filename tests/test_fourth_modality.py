"""A fourth modality added from outside mmfusion/: a 'sensor' reading (a feature vector that
describes the scene) with its own tower type, its own input op and its own TFDS dataset, all
defined in this file, trained contrastively against images by the real CLI and evaluated with
image <-> sensor retrieval. Nothing under mmfusion/ names it.

This file is also the experiment's config file: the CLI run below loads it with
`--config tests/test_fourth_modality.py`, which registers the three parts in that process.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmfusion import config as mmf_config
from mmfusion.data import ops
from mmfusion.data import shapes
from mmfusion.models import layers
from mmfusion.models import towers
from mmfusion.models.encoder import Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENSOR_DIM = 16
IMAGE_SIZE = 32


# -- 1. the tower: the reading cut into `chunks` tokens, a transformer, mean pooling ----------

class SensorTower(nn.Module):
  embed_dim: int
  chunks: int
  stack: layers.StackOptions

  @nn.compact
  def __call__(self, reading_bf, mask=None, *, train=False) -> towers.Encoded:
    batch, dim = reading_bf.shape
    x_bnc = reading_bf.reshape(batch, self.chunks, dim // self.chunks)
    x_bnw = nn.Dense(self.stack.width, name='embed')(x_bnc)
    pos_nw = self.param('pos_embedding', nn.initializers.normal(0.02),
                        (self.chunks, self.stack.width))
    x_bnw = Encoder(self.stack, name='encoder')(x_bnw + pos_nw, None, not train)
    pooled_bw = jnp.mean(x_bnw, axis=1)
    return towers.Encoded(tokens=x_bnw, mask=jnp.ones((batch, self.chunks), bool),
                          pooled=pooled_bw,
                          embedding=towers.projection(self.embed_dim, self.stack)(pooled_bw))


@towers.register('sensor_transformer', options=dict(chunks=4, width=32, depth=1, mlp_dim=64,
                                                    num_heads=2, dropout=0.0))
def make_sensor_tower(options, context):
  return SensorTower(context.embed_dim, options['chunks'], context.stack(options))


# -- 2. the input op: the dataset's 'sensor' feature, with a little noise in training ---------

@ops.register
class SensorOp(ops.Op):
  name = 'sensor'
  num_random = SENSOR_DIM

  def features(self):
    return ('sensor',)

  def spec(self, batch_size):
    return {'sensor': ((batch_size, SENSOR_DIM), np.float32)}

  def standardize(self, ex):
    return {'sensor': ex['sensor']}

  def train(self, batch, u):
    return {'sensor': batch['sensor'] + 0.1 * (u - 0.5)}

  def from_raw(self, values):
    return {'sensor': np.asarray(values, np.float32).reshape(-1, SENSOR_DIM)}


# -- 3. the dataset: the embedded shapes, each with a sensor reading of its scene -------------

def reading(example, rng) -> np.ndarray:
  """Which colours and shapes the scene holds (one-hot sums), where its first object is, and
  noise: a different view of what the image shows."""
  vector = np.zeros(SENSOR_DIM, np.float32)
  for obj in example['objects']:
    vector[shapes.COLOURS.index(obj['colour'])] += 1.0
    vector[len(shapes.COLOURS) + shapes.SHAPES.index(obj['shape'])] += 1.0
  first = example['objects'][0]
  vector[11:13] = first['x'], first['y']
  vector[13] = float(first['size'] == 'large')
  return vector + rng.normal(0.0, 0.05, SENSOR_DIM).astype(np.float32)


class SensorShapes(tfds.core.GeneratorBasedBuilder):
  """Rendered shapes with a sensor reading each; prepared by mmfusion at first use."""
  VERSION = tfds.core.Version('1.0.0')
  RENDERED_LOCALLY = True
  SIZES = {'train': 2048, 'validation': 128, 'test': 128}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
        'sensor': tfds.features.Tensor(shape=(SENSOR_DIM,), dtype=np.float32),
        'label': tfds.features.ClassLabel(names=shapes.CLASS_NAMES),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager   # rendered here: nothing to download
    return {split: self._generate_examples(split) for split in self.SIZES}

  def _generate_examples(self, split):
    split_id = list(self.SIZES).index(split)
    for index in range(self.SIZES[split]):
      rng = np.random.default_rng([7, split_id, index])
      example = shapes.render_example(rng, IMAGE_SIZE)
      yield index, {'image': example['image'], 'sensor': reading(example, rng),
                    'label': example['label']}


# -- the experiment ---------------------------------------------------------------------------

def get_config(arg=None):
  del arg
  config = mmf_config.base()
  config.data.name = 'sensor_shapes'
  config.data.inputs = ('image', 'sensor')
  config.model.towers = dict(
      image=dict(type='vit', patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2),
      sensor=dict(type='sensor_transformer'))
  config.model.embed_dim = 32
  config.objectives = {'softmax_contrastive': dict(weight=1.0, pairs=(('image', 'sensor'),))}
  config.evals = {'retrieval': dict(type='retrieval', every=0, split='validation',
                                    batch_size=128, keep_if={}, pair=('image', 'sensor'))}
  config.total_steps = 150
  config.batch_size = 64
  config.log_every = 50
  config.checkpoint.every = 50
  config.optim.update(lr=2e-3, warmup_steps=20)
  return mmf_config.lock(config)


def test_a_sensor_modality_trains_against_images_through_the_cli(tmp_path):
  env = dict(os.environ, MMFUSION_DATA_DIR=str(tmp_path / 'data'), TF_CPP_MIN_LOG_LEVEL='2')
  run = subprocess.run(
      [sys.executable, '-m', 'mmfusion.main', f'--config={os.path.abspath(__file__)}',
       f'--workdir={tmp_path / "run"}'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=900)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  final = json.load(open(tmp_path / 'run' / 'final_metrics.json'))
  assert final['retrieval/num_image'] == final['retrieval/num_sensor'] == 128
  # One right answer among 128 candidates: chance R@1 is 1/128 and R@5 is 5/128. The pair
  # learns to find it, in both directions.
  for direction in ('i2s', 's2i'):
    assert final[f'retrieval/{direction}_r1'] > 10 / 128, final
    assert final[f'retrieval/{direction}_r5'] > 30 / 128, final
  params = json.load(open(tmp_path / 'run' / 'config.json'))['model']['towers']
  assert params['sensor']['type'] == 'sensor_transformer'


def test_the_sensor_parts_plug_into_the_registries():
  """Registered by this file alone, and built by the core's own code paths."""
  config = get_config()
  mmf_config.validate(config)
  from mmfusion.models import model as model_lib
  model = model_lib.build(config.model, vocab_size=0)
  assert isinstance(model.towers['sensor'], SensorTower)
  batch = {'image': jnp.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3)), 'sensor': jnp.ones((2, SENSOR_DIM))}
  out, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), batch))
  assert out['embeddings']['sensor'].shape == (2, 32)
  assert out['masks']['sensor'].shape == (2, 4)
