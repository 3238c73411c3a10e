"""The embedded dataset, sources, preprocessing ops and the input streams (train resume, eval
padding)."""
import colorsys
import itertools
import re
import threading
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from mmfusion import sharding as sharding_lib
from mmfusion.data import evaluation
from mmfusion.data import image as image_lib
from mmfusion.data import ops
from mmfusion.data import prefetch
from mmfusion.data import shapes
from mmfusion.data import sources
from mmfusion.data import training
from tiny_data import BATCH, assert_same_batches, make_config, take

# Independent reference: the hue (degrees) each colour name should read as.
HUES = {'red': 0, 'orange': 30, 'yellow': 52, 'green': 130, 'blue': 225, 'purple': 280}
RELATION_CHECK = {
    'left of': lambda a, b: a['x'] < b['x'], 'right of': lambda a, b: a['x'] > b['x'],
    'above': lambda a, b: a['y'] < b['y'], 'below': lambda a, b: a['y'] > b['y'],
}


def hue_name(rgb) -> str:
  h, _, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))
  dist = {n: min(abs(h * 360 - d), 360 - abs(h * 360 - d)) for n, d in HUES.items()}
  return min(dist, key=dist.get)


# ------------------------------------------------------------------------------ renderer


def render(seed, index=0, size=64):
  return shapes.render_example(np.random.default_rng([seed, 0, index]), size)


def test_render_is_a_pure_function_of_the_seed():
  a, b, c = render(1, 5), render(1, 5), render(2, 5)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['captions'] == b['captions'] and a['questions'] == b['questions']
  assert not np.array_equal(a['image'], c['image'])


def test_constants():
  assert len(shapes.CLASS_NAMES) == len(shapes.COLOURS) * len(shapes.SHAPES)
  assert all(re.fullmatch(r'[a-z]+ [a-z]+', n) for n in shapes.CLASS_NAMES)
  assert set(HUES) == set(shapes.COLOURS)


@pytest.mark.parametrize('size', [64, 32])
def test_primary_colour_is_in_the_pixels(size):
  """At each object's centre the pixel's hue names its colour, also after the 64 -> 32
  resize the image op does."""
  for index in range(60):
    ex = render(3, index)
    image = ex['image']
    if size != 64:
      image = image_lib.resize_image(tf.constant(image), size).numpy()
    for obj in ex['objects']:
      row, col = int(obj['y'] * size), int(obj['x'] * size)
      assert hue_name(image[row, col]) == obj['colour'], (index, obj)
    corner = image[0, 0].astype(int)
    assert corner.min() > 180, 'background should be light'


def test_captions_and_questions_describe_the_objects():
  counts = {1: 0, 2: 0}
  for index in range(200):
    ex = render(4, index)
    objects, captions = ex['objects'], ex['captions']
    counts[ex['num_objects']] += 1
    assert len(captions) == shapes.NUM_CAPTIONS and len(set(captions)) > 1
    assert len(ex['questions']) == len(ex['answers']) == shapes.NUM_QUESTIONS
    assert all(re.fullmatch(r'[a-z]+( [a-z]+)*', t) for t in captions + ex['questions'])
    assert all(re.fullmatch(r'[a-z]+', a) for a in ex['answers'])
    assert shapes.CLASS_NAMES[ex['label']] == f"{objects[0]['colour']} {objects[0]['shape']}"
    for caption in captions:
      for obj in objects:
        assert obj['colour'] in caption and obj['shape'] in caption, (caption, objects)
    if ex['num_objects'] == 2:
      a, b = objects
      assert shapes.SIZES.index(a['size']) >= shapes.SIZES.index(b['size'])
      assert (a['colour'], a['shape']) != (b['colour'], b['shape'])
      assert RELATION_CHECK[ex['relation']](a, b)
      assert ex['relation'] in captions[0]
      # Never overlapping: far apart along the relation's axis.
      axis = 'x' if ex['relation'] in ('left of', 'right of') else 'y'
      assert abs(a[axis] - b[axis]) > 0.2
    assert ex['answers'][2] == ('one' if ex['num_objects'] == 1 else 'two')
    assert ex['answers'][0] in shapes.COLOURS and ex['answers'][1] in shapes.SHAPES
  assert counts[1] > 60 and counts[2] > 60


# -------------------------------------------------------------------------------- builder


def test_png_encoder_round_trips_through_tensorflow():
  for index in range(5):
    image = render(5, index)['image']
    np.testing.assert_array_equal(tf.io.decode_png(shapes.encode_png(image)).numpy(), image)
  odd = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
  np.testing.assert_array_equal(tf.io.decode_png(shapes.encode_png(odd)).numpy(), odd)


def tfrecords(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.rglob('*.tfrecord*'))}


def test_build_is_byte_identical_for_a_seed(tmp_path, capsys):
  spec = 'tiny,num_train=24,num_validation=8,num_test=8'
  for name in ('a', 'b'):
    sources.get_builder(make_config(tmp_path / name, builder_config=spec).data)
  assert 'Rendered mmfusion_shapes/tiny-num_train24' in capsys.readouterr().out
  a, b = tfrecords(tmp_path / 'a'), tfrecords(tmp_path / 'b')
  assert len(a) == 3 and a == b
  other = make_config(tmp_path / 'c', builder_config=spec + ',seed=1')
  builder = sources.get_builder(other.data)
  assert builder.info.splits['train'].num_examples == 24
  assert list(tfrecords(tmp_path / 'c').values()) != list(a.values())


def test_dataset_features(source):
  builder = source.builder
  assert {s: source.num_examples(s) for s in shapes.SPLITS} == {
      'train': 256, 'validation': 64, 'test': 64}
  ex = next(iter(builder.as_dataset(split='test').take(1)))
  assert ex['image'].shape == (64, 64, 3) and ex['captions'].shape == (5,)
  assert ex['objects']['x'].shape == (int(ex['num_objects']),)
  assert source.class_names() == list(shapes.CLASS_NAMES)
  assert source.where == 'mmfusion_shapes/tiny'


def test_unknown_and_unprepared_datasets_error_clearly(config, tmp_path):
  config.data.name = 'no_such_dataset'
  where = re.escape(config.data.data_dir)
  with pytest.raises(FileNotFoundError, match=f'no_such_dataset.*{where}'):
    sources.get_builder(config.data)

  config.data.name, config.data.data_dir = MmfusionTestUnprepared.name, str(tmp_path)
  with pytest.raises(ValueError, match=r"no builder_config 'tiny'; available: \[\]"):
    sources.get_builder(config.data)
  config.data.builder_config = ''
  with pytest.raises(FileNotFoundError,
                     match=r'not prepared under .*download_and_prepare\(\).*files:PATH'):
    sources.get_builder(config.data)

  config.data.name, config.data.builder_config = 'mmfusion_shapes', 'huge'
  with pytest.raises(ValueError, match=r"'huge'.*\['default', 'spoken', 'spoken_tiny', 'tiny'\]"):
    sources.get_builder(config.data)


class MmfusionTestUnprepared(tfds.core.GeneratorBasedBuilder):
  """Registered but never prepared: get_builder must not try to build it."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(8, 8, 3)), 'captions': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    raise AssertionError('must not be prepared')

  def _generate_examples(self):
    raise AssertionError('must not be prepared')


def test_data_dir_resolution(config, monkeypatch):
  config.data.data_dir = ''
  monkeypatch.setenv('MMFUSION_DATA_DIR', '/some/where')
  assert sources.resolve_data_dir(config.data) == '/some/where'
  monkeypatch.delenv('MMFUSION_DATA_DIR')
  assert sources.resolve_data_dir(config.data).endswith('.cache/mmfusion/datasets')


# ------------------------------------------------------------------------- preprocessing


def test_colour_jitter_keeps_colour_names():
  rgb = np.array([shapes._RGB[c] for c in shapes.COLOURS], np.float32) / 255.0
  images = tf.constant(np.tile(rgb[:, None, None, :], (1, 4, 4, 1)))
  corners = np.array(np.meshgrid(*[[0.0, 0.999]] * 3)).reshape(3, -1).T   # extreme settings
  for u in corners:
    out = image_lib.colour_jitter(images, tf.constant(np.tile(u, (len(rgb), 1)), tf.float32))
    names = [hue_name(px * 255) for px in out.numpy()[:, 0, 0]]
    assert names == list(shapes.COLOURS), u
  identity = image_lib.colour_jitter(images, tf.fill((len(rgb), 3), 0.5))
  np.testing.assert_allclose(identity.numpy(), images.numpy(), atol=1e-6)




def test_from_raw_matches_the_eval_view(source):
  """Plain images and strings (the public API's inputs) become exactly the entries the
  evaluation batches have for the same examples."""
  built = ops.build(source, ['image', 'text'])
  raw = list(source.builder.as_dataset(split='validation').take(4).as_numpy_iterator())
  batch = next(evaluation.batches(source, 'validation', ('image', 'text'), 4))
  images = built['image'].from_raw([ex['image'] for ex in raw])
  np.testing.assert_array_equal(images['image'], batch['image'])
  # Floats in [0, 1] are the same pictures.
  floats = built['image'].from_raw([ex['image'] / 255.0 for ex in raw])
  np.testing.assert_array_equal(floats['image'], batch['image'])
  for i, ex in enumerate(raw):
    text = built['text'].from_raw([c.decode() for c in ex['captions']])
    np.testing.assert_array_equal(text['text'], batch['text'][i])
    np.testing.assert_array_equal(text['text_mask'], batch['text_mask'][i])
  with pytest.raises(ValueError, match='sequence of strings'):
    built['text'].from_raw('a red circle')


def test_unknown_and_eval_only_inputs_error_clearly(config, source):
  with pytest.raises(ValueError, match=r"inputs names \['infrared'\]; known inputs: .*'image'"):
    ops.build(source, ['image', 'infrared'])
  config.data.inputs = ('image', 'infrared')
  with pytest.raises(ValueError, match=r"inputs names \['infrared'\]"):
    ops.training_spec(config, BATCH)
  # A known input whose feature the dataset lacks fails naming the feature and the dataset.
  with pytest.raises(ValueError, match=r"'audio', which reads features \['speech'\]; dataset "
                                       r'mmfusion_shapes/tiny has'):
    ops.build(source, ['image', 'audio'])
  config.data.inputs = ('image', 'objects')
  with pytest.raises(ValueError, match="'objects' is for evaluation only"):
    ops.training_spec(config, BATCH)


# ------------------------------------------------------------------------- tokenizer cache


def test_get_tokenizer_caches_and_round_trips(config, tok, data_dir):
  cached = list((data_dir / 'tokenizers').glob('*.model'))
  assert [p.name for p in cached] == ['mmfusion_shapes_tiny_1.0.0_v128.model']
  assert sources.Source(config).tokenizer.model_path == tok.model_path
  # A slice of the train split shares the whole split's tokenizer.
  config.data.train_split = 'train[:50%]'
  assert sources.Source(config).tokenizer.model_path == tok.model_path
  config.tokenizer.model = str(data_dir / 'nope.model')
  with pytest.raises(FileNotFoundError, match=r'tokenizer\.model.*nope\.model'):
    sources.Source(config).tokenizer


# -------------------------------------------------------------------------------- training


@pytest.fixture(scope='module')
def fresh(data_dir, sharding):
  """Batches 0..11 of a fresh run (epoch 0 is steps 0-7)."""
  return take(training.batches(sources.Source(make_config(data_dir)), sharding), 12)


def test_train_batches_shapes_and_ranges(source, tok, fresh):
  assert training.steps_per_epoch(source) == 256 // BATCH
  b = fresh[0]
  assert b.keys() == {'image', 'text', 'text_mask', 'label'}    # config.data.inputs' entries
  assert b['image'].shape == (BATCH, 32, 32, 3) and b['image'].dtype == np.float32
  assert b['text'].shape == (BATCH, 20) and b['text'].dtype == np.int32
  assert b['text_mask'].shape == (BATCH, 20) and b['text_mask'].dtype == np.bool_
  assert b['label'].shape == (BATCH,) and b['label'].dtype == np.int32
  assert -1.0 <= b['image'].min() < 0 < b['image'].max() <= 1.0
  lengths = b['text_mask'].sum(axis=1)
  assert (b['text'][np.arange(BATCH), lengths - 1] == tok.eos_id).all()
  for text, label in zip(tok.decode(b['text']), b['label']):
    colour, shape = shapes.CLASS_NAMES[label].split()
    assert colour in text and shape in text


def test_training_spec_is_what_the_stream_yields(config, fresh):
  """The model is initialised from ops.training_spec before any data is read: it must be
  exactly the batches' entries, shapes and dtypes."""
  spec = ops.training_spec(config, BATCH)
  assert spec == {k: (v.shape, v.dtype.type) for k, v in fresh[0].items()}


def test_train_is_deterministic_and_seeded(config, sharding, fresh):
  assert_same_batches(take(training.batches(sources.Source(config), sharding), 3), fresh[:3])
  config.seed = 1
  other = take(training.batches(sources.Source(config), sharding), 1)
  assert not np.array_equal(other[0]['image'], fresh[0]['image'])


@pytest.mark.parametrize('start', [3, 7, 8, 10])
def test_resume_gives_the_same_batches(source, sharding, fresh, start):
  resumed = training.batches(source, sharding, start_step=start)
  assert_same_batches(take(resumed, 2), fresh[start:start + 2])


def test_streaming_path_resumes_exactly(source, tok, sharding, monkeypatch):
  """Data too large to hold in memory stream through a shuffle buffer; same guarantees."""
  monkeypatch.setattr(training, 'IN_MEMORY_LIMIT_BYTES', 0)
  fresh = take(training.batches(source, sharding), 10)
  assert_same_batches(take(training.batches(source, sharding), 2), fresh[:2])
  for start in (7, 8):
    resumed = training.batches(source, sharding, start_step=start)
    assert_same_batches(take(resumed, 2), fresh[start:start + 2])
  for text, label in zip(tok.decode(fresh[9]['text']), fresh[9]['label']):
    assert all(word in text for word in shapes.CLASS_NAMES[label].split())


def test_an_epoch_is_a_permutation_of_the_split(config, source):
  """Without augmentation, epoch 0's images are exactly the train split's images."""
  config.data.augment = False
  local = training.local_batches(source)
  train = np.concatenate([b['image'] for b in take(local, training.steps_per_epoch(source))])
  evals = np.concatenate([b['image'][b['_valid']] for b in
                          evaluation.batches(source, 'train', ('image',), 100)])
  key = lambda images: sorted(im.tobytes() for im in images)   # noqa: E731
  assert len(set(key(train))) == 256 and key(train) == key(evals)


# ------------------------------------------------------------------------------ evaluation

EVAL_INPUTS = ('image', 'text', 'label')


def test_eval_batches_pad_and_mask(source, tok):
  batches = list(evaluation.batches(source, 'validation', EVAL_INPUTS, batch_size=24))
  assert [int(b['_valid'].sum()) for b in batches] == [24, 24, 16]
  last = batches[-1]
  assert last.keys() == {'image', 'text', 'text_mask', 'label', '_valid'}
  assert last['image'].shape == (24, 32, 32, 3) and last['text'].shape == (24, 5, 20)
  assert last['text_mask'].dtype == np.bool_ and last['label'].dtype == np.int32
  assert not last['image'][16:].any() and not last['text_mask'][16:].any()
  # Same order and text as the dataset itself.
  raw = source.builder.as_dataset(split='validation')
  raw = list(raw.take(3).as_numpy_iterator())
  for i, ex in enumerate(raw):
    assert tok.decode(batches[0]['text'][i]) == [c.decode() for c in ex['captions']]
    assert batches[0]['label'][i] == ex['label']


def test_eval_batches_carry_only_the_inputs_asked_for(source):
  full = next(evaluation.batches(source, 'validation', EVAL_INPUTS, 24))
  text = next(evaluation.batches(source, 'validation', ('text',), 24))
  assert text.keys() == {'text', 'text_mask', '_valid'}
  assert_same_batches([text], [full], keys=('text', 'text_mask', '_valid'))
  label = next(evaluation.batches(source, 'validation', ('label',), 24, {'num_objects': 1}))
  assert label.keys() == {'label', 'num_objects', '_valid'}


def test_eval_keep_if_and_split_slicing(source):
  raw = source.builder.as_dataset(split='test')
  expected = sum(int(ex['num_objects']) == 1 for ex in raw.as_numpy_iterator())
  batches = list(evaluation.batches(source, 'test', EVAL_INPUTS, 16, keep_if={'num_objects': 1}))
  assert batches[0]['num_objects'].dtype == np.int32
  valid = np.concatenate([b['num_objects'][b['_valid']] for b in batches])
  assert len(valid) == expected == source.count('test', {'num_objects': 1})
  assert (valid == 1).all()
  assert source.count('test') == 64
  sliced = evaluation.batches(source, 'validation[:50%]', EVAL_INPUTS, 64)
  assert [int(b['_valid'].sum()) for b in sliced] == [32]
  with pytest.raises(ValueError, match="'colour'.*num_objects"):
    evaluation.batches(source, 'test', EVAL_INPUTS, 16, keep_if={'colour': 1})


def test_train_split_slicing(config, source):
  config.data.train_split = 'train[:50%]'
  assert training.steps_per_epoch(source) == 128 // BATCH
  assert source.base_train_split == 'train'     # vocabularies still come from the whole split
  config.batch_size = 512
  with pytest.raises(ValueError, match='fewer than one batch'):
    training.steps_per_epoch(source)


def test_device_prefetch_keeps_items_ahead_on_a_thread():
  pulled = []

  def produced():
    for i in range(5):
      pulled.append(i)
      yield i

  it = prefetch.prefetch(produced(), 2)
  assert next(it) == 0
  deadline = time.time() + 10
  while len(pulled) < 4 and time.time() < deadline:   # 1 consumed + 2 queued + 1 waiting
    time.sleep(0.01)
  assert pulled == [0, 1, 2, 3]    # produced ahead, without the consumer asking
  assert list(it) == [1, 2, 3, 4]
  assert list(prefetch.prefetch(iter(range(3)), 0)) == [0, 1, 2]


def test_device_prefetch_reraises_producer_errors_in_order_and_stops_when_closed():
  def failing():
    yield 0
    yield 1
    raise OSError('corrupt record 7')

  it = prefetch.prefetch(failing(), 4)
  assert [next(it), next(it)] == [0, 1]
  with pytest.raises(OSError, match='corrupt record 7'):
    next(it)

  endless = prefetch.prefetch(itertools.count(), 2)
  assert next(endless) == 0
  endless.close()     # the producer thread is told to stop and joined
  assert not any(t.name == 'mmfusion-prefetch' and t.is_alive() for t in threading.enumerate())


def test_batch_sharding_with_several_mesh_axes(source, fresh):
  mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch_sharding = sharding_lib.batch_sharding(mesh)     # as the trainer builds it
  assert batch_sharding.spec == P(('data', 'fsdp'))
  assert_same_batches(take(training.batches(source, batch_sharding), 1), fresh[:1])


def test_batch_sharding_with_trailing_axes(source, fresh):
  """A spec with entries past the batch axis still fits entries of rank 1 (label)."""
  mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batches = training.batches(source, NamedSharding(mesh, P(('data', 'fsdp'), None)))
  assert_same_batches(take(batches, 1), fresh[:1])


def as_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  monkeypatch.setattr(jax, 'process_index', lambda: index)


def test_processes_read_disjoint_parts(config, source, monkeypatch):
  config.data.augment = False
  keep_if = {'num_objects': 2}
  single = list(evaluation.batches(source, 'test', ('image',), 8, keep_if=keep_if))
  parts, epochs = [], []
  for index in range(2):
    as_process(monkeypatch, index, 2)
    parts.append(list(evaluation.batches(source, 'test', ('image',), 8, keep_if=keep_if)))
    local = take(training.local_batches(source), training.steps_per_epoch(source))
    epochs.append(np.concatenate([b['image'] for b in local]))
  # Every process runs the same number of eval batches; together they are the split.
  assert len(parts[0]) == len(parts[1])
  valid = lambda bs: np.concatenate([b['image'][b['_valid']] for b in bs])  # noqa: E731
  np.testing.assert_array_equal(np.concatenate([valid(p) for p in parts]), valid(single))
  # Each process trains on its own half, with half the global batch.
  assert epochs[0].shape == epochs[1].shape == (256 // 2 // (BATCH // 2) * (BATCH // 2),
                                                32, 32, 3)
  seen = [{im.tobytes() for im in e} for e in epochs]
  assert len(seen[0]) == len(seen[1]) == 128 and not seen[0] & seen[1]


def test_order_ignores_tensorflows_global_seed(source, sharding, fresh):
  tf.random.set_seed(1234)
  try:
    assert_same_batches(take(training.batches(source, sharding), 2), fresh[:2])
  finally:
    tf.random.set_seed(None)
