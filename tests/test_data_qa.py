"""Question-answer pairs and object attributes as inputs (VQA, captioning evals), and the
independence of inputs: each op draws its random numbers from its own stream."""
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmfusion.data import evaluation
from mmfusion.data import ops
from mmfusion.data import shapes
from mmfusion.data import sources
from mmfusion.data import text as text_lib
from mmfusion.data import training
from tiny_data import BATCH, MAX_LEN, assert_same_batches, make_config, take

QA_INPUTS = ('image', 'question')
QA_KEYS = {'image', 'question', 'question_mask', 'answer'}


def raw_split(data_dir, split):
  builder = sources.get_builder(make_config(data_dir).data)
  return list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())


def qa_source(data_dir, **data):
  """A VQA run's source: images and questions, without colour jitter unless asked."""
  return sources.Source(make_config(data_dir, **{'inputs': QA_INPUTS, 'augment': False,
                                                 **data}))


@pytest.fixture(scope='module')
def train_split(data_dir, tok):
  """The train split in file order: its images as the image op sees them (to find an
  example from a batch row), and each example's questions as the tokenizer reads them
  back (it is trained on captions only: letters no caption has, such as the z of 'size',
  come back as unknown pieces) and answers."""
  source = sources.Source(make_config(data_dir))
  images = np.concatenate([b['image'][b['_valid']] for b in
                           evaluation.batches(source, 'train', ('image',), 128)])
  raw = raw_split(data_dir, 'train')
  assert len(images) == len(raw) == 256
  row = {image.tobytes(): i for i, image in enumerate(images)}
  assert len(row) == 256
  questions = [tok.decode(tok.encode([q.decode() for q in ex['questions']], MAX_LEN)[0])
               for ex in raw]
  answers = [[a.decode() for a in ex['answers']] for ex in raw]
  return row, questions, answers


def question_choices(batches, train_split, vocab, tok):
  """(example, question index) of every row of `batches` (made without colour jitter),
  checking on the way that the row's answer is that question's answer."""
  row, questions, answers = train_split
  out = []
  for b in batches:
    for image, text, answer in zip(b['image'], tok.decode(b['question']), b['answer']):
      i = row[image.tobytes()]
      assert questions[i].count(text) == 1, (text, questions[i])
      j = questions[i].index(text)
      true = answers[i][j]
      assert answer == (vocab.index(true) if true in vocab else -1), (text, true, answer)
      out.append((i, j))
  return out


@pytest.fixture(scope='module')
def fresh(data_dir, sharding):
  """Batches 0..15 (two epochs) of a fresh VQA run, without colour jitter."""
  return take(training.batches(qa_source(data_dir), sharding), 16)


# ---------------------------------------------------------------------- answer vocabulary


def test_answer_vocab_content_and_cache(source, data_dir):
  vocab = source.answers
  train_answers = {a.decode() for ex in raw_split(data_dir, 'train') for a in ex['answers']}
  assert vocab == sorted(train_answers)
  expected = {'yes', 'no', 'one', 'two', *shapes.COLOURS, *shapes.SHAPES, *shapes.SIZES}
  assert set(vocab) == expected     # 'zero' never occurs: every image has 1 or 2 objects
  path = data_dir / 'tokenizers' / 'mmfusion_shapes_tiny_1.0.0_answers.json'
  assert json.loads(path.read_text()) == vocab
  # Once cached, the file is what every later call returns (no re-reading of the split).
  original = path.read_text()
  try:
    path.write_text(json.dumps(['no', 'yes']))
    assert text_lib.answer_vocab(source) == ['no', 'yes']
    assert sources.Source(source.config).answers == ['no', 'yes']
  finally:
    path.write_text(original)
  assert text_lib.answer_vocab(source) == vocab


def test_answers_outside_the_vocab_are_minus_one(data_dir, tok, train_split, monkeypatch):
  full = sources.Source(make_config(data_dir)).answers
  vocab = [a for a in full if a not in ('yes', 'red')]
  monkeypatch.setattr(text_lib, 'answer_vocab', lambda _: vocab)
  source = qa_source(data_dir)
  assert source.answers == vocab
  batch = next(evaluation.batches(source, 'train', ('question',), 64))
  _, _, answers = train_split
  expected = [[vocab.index(a) if a in vocab else -1 for a in ex] for ex in answers[:64]]
  np.testing.assert_array_equal(batch['answer'], expected)
  assert (batch['answer'] == -1).any()
  train = take(training.local_batches(source), 2)
  question_choices(train, train_split, vocab, tok)     # checks -1 for 'yes' and 'red'
  assert any((b['answer'] == -1).any() for b in train)


# ------------------------------------------------------------------------------ training


def test_train_questions_match_their_answers(data_dir, tok, fresh, train_split):
  b = fresh[0]
  assert b['question'].shape == (BATCH, MAX_LEN) and b['question'].dtype == np.int32
  assert b['question_mask'].shape == (BATCH, MAX_LEN) and b['question_mask'].dtype == np.bool_
  assert b['answer'].shape == (BATCH,) and b['answer'].dtype == np.int32
  assert b.keys() == QA_KEYS     # only what config.data.inputs asks for
  # The spec the model is initialised with before any data is read.
  spec = ops.training_spec(make_config(data_dir, inputs=QA_INPUTS), BATCH)
  assert spec == {k: (v.shape, v.dtype.type) for k, v in b.items()}
  lengths = b['question_mask'].sum(axis=1)
  assert (b['question'][np.arange(BATCH), lengths - 1] == tok.eos_id).all()
  assert (b['answer'] >= 0).all()     # train answers are all in the vocabulary
  question_choices(fresh, train_split, qa_source(data_dir).answers, tok)


def test_streamed_questions_match_and_resume_exactly(data_dir, tok, sharding, train_split,
                                                      monkeypatch):
  """Data too large for memory tokenize the chosen question per batch; same guarantees."""
  monkeypatch.setattr(training, 'IN_MEMORY_LIMIT_BYTES', 0)
  source = qa_source(data_dir)
  fresh = take(training.batches(source, sharding), 10)
  question_choices(fresh, train_split, source.answers, tok)
  resumed = training.batches(source, sharding, start_step=8)
  assert_same_batches(take(resumed, 2), fresh[8:10])


@pytest.mark.parametrize('start', [3, 8, 10])
def test_resume_gives_the_same_questions(data_dir, sharding, fresh, start):
  resumed = training.batches(qa_source(data_dir), sharding, start_step=start)
  assert_same_batches(take(resumed, 2), fresh[start:start + 2])


def test_question_choice_varies_over_examples_and_epochs(data_dir, tok, fresh, train_split):
  source = qa_source(data_dir)
  choices = question_choices(fresh, train_split, source.answers, tok)
  steps = training.steps_per_epoch(source)
  epochs = [dict(choices[:steps * BATCH]), dict(choices[steps * BATCH:])]
  assert len(epochs[0]) == len(epochs[1]) == 256     # each epoch is the whole split
  counts = np.bincount(list(epochs[0].values()), minlength=shapes.NUM_QUESTIONS)
  assert (counts > 256 / shapes.NUM_QUESTIONS / 2).all(), counts   # ~51 each
  changed = sum(epochs[0][i] != epochs[1][i] for i in epochs[0])
  assert changed > 256 / 2, changed     # 4/5 of them on average


# Subsets (and orders) of ALL_INPUTS, each with an input that decides nothing about the
# example order (the in-memory / streaming choice is by bytes per example, so every set
# here takes the same path).
ALL_INPUTS = ('image', 'text', 'label', 'question')
SUBSETS = [('image', 'text', 'label'), ('image', 'text'), ('text', 'label'), ('image',),
           ('question', 'image'), ('question', 'text'), ('label', 'question', 'text', 'image')]


@pytest.mark.parametrize('streaming', [False, True])
def test_adding_or_removing_inputs_never_changes_the_others(data_dir, monkeypatch, streaming):
  """Each op draws its random numbers (caption choice, colour jitter, question choice) from
  its own stream, so a batch's entries do not depend on which other inputs are asked for
  (or their order): e.g. asking for questions as well leaves the caption/jitter batches as
  they were, and training on ('image', 'text') sees the images and texts that
  ('image', 'text', 'label') sees. Each run's batches have exactly its inputs' entries."""
  if streaming:
    monkeypatch.setattr(training, 'IN_MEMORY_LIMIT_BYTES', 0)

  def run(inputs):
    # From the middle of epoch 0 into epoch 1, with colour jitter on.
    return take(training.local_batches(sources.Source(make_config(data_dir, inputs=inputs)),
                                       start_step=7), 2)

  every = run(ALL_INPUTS)
  for inputs in SUBSETS:
    keys = set(ops.training_spec(make_config(data_dir, inputs=inputs), BATCH))
    batches = run(inputs)
    assert all(b.keys() == keys for b in batches), inputs
    assert_same_batches(batches, every, keys=sorted(keys))


def test_op_streams_are_distinct(data_dir):
  """The caption and question choices (5 each per example) come from different streams:
  were they one stream, each example would pick the same index for both."""
  config = make_config(data_dir, inputs=('text', 'question'))
  built = ops.build(sources.Source(config), config.data.inputs)
  numbers = {name: training._random_numbers(config, 0, op, 256).numpy()
             for name, op in built.items()}
  picks = {name: np.minimum((u[:, 0] * 5).astype(int), 4) for name, u in numbers.items()}
  assert (picks['text'] != picks['question']).mean() > 0.6     # 4/5 differ on average


# ---------------------------------------------------------------------------- evaluation

EVAL_INPUTS = ('question', 'objects')


def test_eval_batches_carry_questions_and_objects(source, tok, data_dir):
  vocab = source.answers
  batches = list(evaluation.batches(source, 'validation', EVAL_INPUTS, batch_size=24))
  assert [int(b['_valid'].sum()) for b in batches] == [24, 24, 16]
  last = batches[-1]
  assert last.keys() == {'question', 'question_mask', 'answer', 'object_colour',
                         'object_shape', 'object_size', '_valid'}
  assert last['question'].shape == last['question_mask'].shape == (24, 5, MAX_LEN)
  assert last['question'].dtype == np.int32 and last['question_mask'].dtype == np.bool_
  assert last['answer'].shape == (24, 5) and last['answer'].dtype == np.int32
  for name in ('colour', 'shape', 'size'):
    assert last[f'object_{name}'].shape == (24, 2) and last[f'object_{name}'].dtype == np.int32
    assert not last[f'object_{name}'][16:].any()          # padding rows are zeros
  assert not last['question_mask'][16:].any() and not last['answer'][16:].any()

  valid = {k: np.concatenate([b[k][b['_valid']] for b in batches]) for k in batches[0]}
  raw = raw_split(data_dir, 'validation')
  names = {'colour': shapes.COLOURS, 'shape': shapes.SHAPES, 'size': shapes.SIZES}
  # The renderer's own objects, found by captions: TFDS stores examples in hashed-key
  # order, not in the order of the indices they are rendered from ([seed, split, index]).
  rendered = [shapes.render_example(np.random.default_rng([0, 1, i]), 64) for i in range(64)]
  rendered = {tuple(r['captions']): r['objects'] for r in rendered}
  assert len(rendered) == 64
  for i, ex in enumerate(raw):
    questions = [q.decode() for q in ex['questions']]
    assert tok.decode(valid['question'][i]) == tok.decode(tok.encode(questions, MAX_LEN)[0])
    expected = [vocab.index(a.decode()) if a.decode() in vocab else -1 for a in ex['answers']]
    np.testing.assert_array_equal(valid['answer'][i], expected)
    num = int(ex['num_objects'])
    objects = rendered[tuple(c.decode() for c in ex['captions'])]
    assert len(objects) == num
    for name, labels in names.items():
      ids = valid[f'object_{name}'][i]
      assert [labels[k] for k in ids[:num]] == [o[name] for o in objects]
      assert list(ids[num:]) == [-1] * (2 - num)


def test_eval_keep_if_and_processes_keep_questions_aligned(source, monkeypatch):
  keep_if = {'num_objects': 2}
  single = list(evaluation.batches(source, 'test', EVAL_INPUTS, 8, keep_if=keep_if))
  assert all((b['object_colour'][b['_valid']] >= 0).all() for b in single)
  assert all((b['num_objects'][b['_valid']] == 2).all() for b in single)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    parts.append(list(evaluation.batches(source, 'test', EVAL_INPUTS, 8, keep_if=keep_if)))
  assert len(parts[0]) == len(parts[1])
  for key in ('question', 'answer', 'object_shape'):
    joined = np.concatenate([b[key][b['_valid']] for p in parts for b in p])
    np.testing.assert_array_equal(joined, np.concatenate([b[key][b['_valid']] for b in single]))


# ------------------------------------------------------ datasets without questions or objects


class MmfusionTestPlain(tfds.core.GeneratorBasedBuilder):
  """Images and captions only: no labels, questions or objects."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(8, 8, 3)), 'captions': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(8), 'test': self._generate_examples(5)}

  def _generate_examples(self, num):
    for i in range(num):
      yield i, {'image': np.full((8, 8, 3), 20 * i, np.uint8), 'captions': f'a red circle {i}'}


def test_datasets_without_questions_or_objects(tmp_path, tok):
  tfds.builder(MmfusionTestPlain.name, data_dir=str(tmp_path)).download_and_prepare()
  config = make_config(tmp_path, name=MmfusionTestPlain.name, builder_config='',
                       inputs=('image', 'text'))
  config.tokenizer.model = tok.model_path
  config.batch_size = 4
  source = sources.Source(config)
  batch = next(evaluation.batches(source, 'test', ('image', 'text'), 4))
  assert batch.keys() == {'image', 'text', 'text_mask', '_valid'}
  assert batch['text'].shape == (4, 1, MAX_LEN)       # one caption (a Text feature) each
  # (The tiny dataset's tokenizer has no digits: only the words come back.)
  assert all(t.startswith('a red circle ') for t in tok.decode(batch['text'][:, 0]))
  assert next(training.local_batches(source)).keys() == {'image', 'text', 'text_mask'}
  # Inputs whose features the dataset lacks name the input, the features and the dataset.
  for inputs, features in [(('image', 'label'), r"\['label'\]"),
                           (('image', 'question'), r"\['questions', 'answers'\]")]:
    config.data.inputs = inputs
    with pytest.raises(ValueError, match=rf"'{inputs[1]}'.*{features}.*mmfusion_test_plain"):
      next(training.local_batches(source))
  with pytest.raises(ValueError, match=r"'objects'.*\['objects'\].*mmfusion_test_plain"):
    evaluation.batches(source, 'test', ('image', 'objects'), 4)
  # The answer classes name the feature they come from, not an input op.
  with pytest.raises(ValueError, match=r'answer classes come from an "answers" feature.*'
                                       r'mmfusion_test_plain'):
    source.answers
  with pytest.raises(ValueError, match=r'no ClassLabel feature "label"'):
    source.class_names()
