"""Question-answer pairs and object attributes in the input pipeline (VQA, captioning evals)."""
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmfusion.data import pipeline
from mmfusion.data import shapes
from tiny_data import BATCH, MAX_LEN, assert_same_batches, make_config, take

QA_INPUTS = ('image', 'question', 'question_mask', 'answer')
OLD_KEYS = {'image', 'text', 'text_mask', 'label'}


def raw_split(data_dir, split):
  builder = pipeline.get_builder(make_config(data_dir).data)
  return list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())


@pytest.fixture(scope='module')
def train_split(data_dir, tok):
  """The train split in file order: its images as the pipeline sees them (to find an
  example from a batch row), and each example's questions as the tokenizer reads them
  back (it is trained on captions only: letters no caption has, such as the z of 'size',
  come back as unknown pieces) and answers."""
  config = make_config(data_dir)
  images = np.concatenate([b['image'][b['_valid']] for b in
                           pipeline.eval_batches(config, 'train', tok, 128)])
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
def fresh(data_dir, tok, sharding):
  """Batches 0..15 (two epochs) of a fresh VQA run, without colour jitter."""
  config = make_config(data_dir, inputs=QA_INPUTS, augment=False)
  return take(pipeline.train_iterator(config, tok, sharding), 16)


# ---------------------------------------------------------------------- answer vocabulary


def test_answer_vocab_content_and_cache(config, data_dir):
  vocab = pipeline.answer_vocab(config)
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
    assert pipeline.answer_vocab(config) == ['no', 'yes']
  finally:
    path.write_text(original)
  assert pipeline.answer_vocab(config) == vocab


def test_answers_outside_the_vocab_are_minus_one(config, tok, train_split, monkeypatch):
  vocab = [a for a in pipeline.answer_vocab(config) if a not in ('yes', 'red')]
  monkeypatch.setattr(pipeline, 'answer_vocab', lambda _: vocab)
  batch = next(pipeline.eval_batches(config, 'train', tok, 64))
  _, _, answers = train_split
  expected = [[vocab.index(a) if a in vocab else -1 for a in ex] for ex in answers[:64]]
  np.testing.assert_array_equal(batch['answers'], expected)
  assert (batch['answers'] == -1).any()
  config.data.update(inputs=QA_INPUTS, augment=False)
  train = take(pipeline.local_train_batches(config, tok), 2)
  question_choices(train, train_split, vocab, tok)     # checks -1 for 'yes' and 'red'
  assert any((b['answer'] == -1).any() for b in train)


# ------------------------------------------------------------------------------ training


def test_train_questions_match_their_answers(config, tok, fresh, train_split):
  b = fresh[0]
  assert b['question'].shape == (BATCH, MAX_LEN) and b['question'].dtype == np.int32
  assert b['question_mask'].shape == (BATCH, MAX_LEN) and b['question_mask'].dtype == np.bool_
  assert b['answer'].shape == (BATCH,) and b['answer'].dtype == np.int32
  assert b.keys() == OLD_KEYS | {'question', 'question_mask', 'answer'}
  lengths = b['question_mask'].sum(axis=1)
  assert (b['question'][np.arange(BATCH), lengths - 1] == tok.eos_id).all()
  assert (b['answer'] >= 0).all()     # train answers are all in the vocabulary
  question_choices(fresh, train_split, pipeline.answer_vocab(config), tok)


def test_streamed_questions_match_and_resume_exactly(config, tok, sharding, train_split,
                                                      monkeypatch):
  """Data too large for memory tokenize the chosen question per batch; same guarantees."""
  monkeypatch.setattr(pipeline, '_IN_MEMORY_LIMIT_BYTES', 0)
  config.data.update(inputs=QA_INPUTS, augment=False)
  fresh = take(pipeline.train_iterator(config, tok, sharding), 10)
  question_choices(fresh, train_split, pipeline.answer_vocab(config), tok)
  resumed = pipeline.train_iterator(config, tok, sharding, start_step=8)
  assert_same_batches(take(resumed, 2), fresh[8:10])


@pytest.mark.parametrize('start', [3, 8, 10])
def test_resume_gives_the_same_questions(data_dir, tok, sharding, fresh, start):
  config = make_config(data_dir, inputs=QA_INPUTS, augment=False)
  resumed = pipeline.train_iterator(config, tok, sharding, start_step=start)
  assert_same_batches(take(resumed, 2), fresh[start:start + 2])


def test_question_choice_varies_over_examples_and_epochs(config, tok, fresh, train_split):
  choices = question_choices(fresh, train_split, pipeline.answer_vocab(config), tok)
  steps = pipeline.steps_per_epoch(config)
  epochs = [dict(choices[:steps * BATCH]), dict(choices[steps * BATCH:])]
  assert len(epochs[0]) == len(epochs[1]) == 256     # each epoch is the whole split
  counts = np.bincount(list(epochs[0].values()), minlength=shapes.NUM_QUESTIONS)
  assert (counts > 256 / shapes.NUM_QUESTIONS / 2).all(), counts   # ~51 each
  changed = sum(epochs[0][i] != epochs[1][i] for i in epochs[0])
  assert changed > 256 / 2, changed     # 4/5 of them on average


@pytest.mark.parametrize('streaming', [False, True])
def test_inputs_without_questions_keep_their_batches(data_dir, tok, monkeypatch, streaming):
  """Asking for questions adds keys and changes nothing else: the caption choice and colour
  jitter draw the same numbers; and without them the batches have exactly the old keys."""
  if streaming:
    monkeypatch.setattr(pipeline, '_IN_MEMORY_LIMIT_BYTES', 0)
  old = take(pipeline.local_train_batches(make_config(data_dir), tok, start_step=7), 2)
  config = make_config(data_dir, inputs=QA_INPUTS)
  new = take(pipeline.local_train_batches(config, tok, start_step=7), 2)
  assert all(b.keys() == OLD_KEYS for b in old)
  assert_same_batches(new, old, keys=OLD_KEYS)


# ---------------------------------------------------------------------------- evaluation


def test_eval_batches_carry_questions_and_objects(config, tok, data_dir):
  vocab = pipeline.answer_vocab(config)
  batches = list(pipeline.eval_batches(config, 'validation', tok, batch_size=24))
  assert [int(b['_valid'].sum()) for b in batches] == [24, 24, 16]
  last = batches[-1]
  assert last['questions'].shape == last['questions_mask'].shape == (24, 5, MAX_LEN)
  assert last['questions'].dtype == np.int32 and last['questions_mask'].dtype == np.bool_
  assert last['answers'].shape == (24, 5) and last['answers'].dtype == np.int32
  for name in ('colour', 'shape', 'size'):
    assert last[f'object_{name}'].shape == (24, 2) and last[f'object_{name}'].dtype == np.int32
    assert not last[f'object_{name}'][16:].any()          # padding rows are zeros
  assert not last['questions_mask'][16:].any() and not last['answers'][16:].any()

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
    assert tok.decode(valid['questions'][i]) == tok.decode(tok.encode(questions, MAX_LEN)[0])
    expected = [vocab.index(a.decode()) if a.decode() in vocab else -1 for a in ex['answers']]
    np.testing.assert_array_equal(valid['answers'][i], expected)
    num = int(ex['num_objects'])
    assert valid['num_objects'][i] == num
    objects = rendered[tuple(c.decode() for c in ex['captions'])]
    for name, labels in names.items():
      ids = valid[f'object_{name}'][i]
      assert [labels[k] for k in ids[:num]] == [o[name] for o in objects]
      assert list(ids[num:]) == [-1] * (2 - num)


def test_eval_keep_if_and_processes_keep_questions_aligned(config, tok, monkeypatch):
  single = list(pipeline.eval_batches(config, 'test', tok, 8, keep_if={'num_objects': 2}))
  assert all((b['object_colour'][b['_valid']] >= 0).all() for b in single)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    parts.append(list(pipeline.eval_batches(config, 'test', tok, 8, keep_if={'num_objects': 2})))
  assert len(parts[0]) == len(parts[1])
  for key in ('questions', 'answers', 'object_shape'):
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
  config = make_config(tmp_path, name=MmfusionTestPlain.name, builder_config='')
  config.batch_size = 4
  batch = next(pipeline.eval_batches(config, 'test', tok, 4))
  assert batch.keys() == {'image', 'captions', 'captions_mask', '_valid'}
  assert next(pipeline.local_train_batches(config, tok)).keys() == {'image', 'text',
                                                                     'text_mask'}
  config.data.inputs = QA_INPUTS
  with pytest.raises(ValueError, match=r'needs question-answer pairs.*mmfusion_test_plain'):
    pipeline.local_train_batches(config, tok)
  with pytest.raises(ValueError, match=r'answer_vocab needs question-answer pairs'):
    pipeline.answer_vocab(config)
