"""Input pipelines: TFDS -> tf.data (each host reads its own part) -> global jax.Arrays.

Owns finding (or rendering) datasets, the tokenizer and answer-vocabulary caches, the exactly
resumable training iterator and the padded, masked evaluation batches.

Training order is a pure function of (config.seed, step, data config, process count):
epoch e = step // steps_per_epoch is a shuffle of the host's examples seeded by
(seed, process, e), with the last partial batch dropped; caption choice, colour jitter and
(when asked for) question choice come from stateless random numbers indexed by
(seed, process, e, example id). Resuming at step s skips s % steps_per_epoch batches of
epoch e before the per-batch work: datasets whose resized images fit in memory are decoded
once per run, larger ones are decoded after the skip, so resuming never decodes what it
skips.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import queue
import re
import threading
import time
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mmfusion.data import preprocess
from mmfusion.data import shapes
from mmfusion.data import tokenizer as tokenizer_lib


def _hide_accelerators_from_tensorflow() -> None:
  # tf.data only needs CPUs; a TF that grabs a GPU/TPU takes its memory from JAX.
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):   # already initialised, or no such device type
      pass


_hide_accelerators_from_tensorflow()

_DEFAULT_DATA_DIR = os.path.join('~', '.cache', 'mmfusion', 'datasets')
# A host's training images are decoded and resized once and kept in memory when they
# fit in this many bytes; larger datasets are decoded anew each epoch.
_IN_MEMORY_LIMIT_BYTES = 2 << 30
_LOAD_CHUNK = 1024              # examples per batch when loading into memory
_NUM_RANDOM = 1 + preprocess.NUM_JITTER_PARAMS   # caption choice + colour jitter
# Batch keys that ask the training pipeline for one question (and its answer) per example.
QUESTION_INPUTS = ('question', 'question_mask', 'answer')
# Objects per example whose attributes the eval batches carry (mmfusion_shapes has 1 or 2);
# absent objects read -1, further ones are left out.
_EVAL_OBJECTS = 2
_OBJECT_ATTRIBUTES = ('colour', 'shape', 'size')


# ---------------------------------------------------------------------------- datasets


def resolve_data_dir(data_config: Any) -> str:
  """config.data.data_dir, else $MMFUSION_DATA_DIR, else ~/.cache/mmfusion/datasets."""
  data_dir = data_config.data_dir or os.environ.get('MMFUSION_DATA_DIR') or _DEFAULT_DATA_DIR
  return os.path.expanduser(data_dir)


def get_builder(data_config: Any) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder named by config.data; never downloads.

  The embedded `mmfusion_shapes` is rendered into the data dir the first time. Any other
  dataset must have been prepared there already (`tfds build`).
  """
  data_dir = resolve_data_dir(data_config)
  if data_config.name == shapes.NAME:
    return _shapes_builder(data_config.builder_config or 'default', data_dir)
  return _prepared_builder(data_config.name, data_config.builder_config, data_dir)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # builder.is_prepared() logs a warning for every dataset that is not there yet. TFDS
  # renames a finished dataset into place, so its info file means it is complete.
  return tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json'))


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Silences TFDS's progress bars and stdout banners (we print one line instead)."""
  bars_were_on = getattr(tfds.core.utils.tqdm_utils, '_active', True)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(bars_were_on)


def _shapes_builder(spec: str, data_dir: str) -> tfds.core.DatasetBuilder:
  config = shapes.config_from_spec(spec)
  # Registered configs by name: TFDS only accepts its own object for a registered name.
  arg = config.name if config in shapes.MmfusionShapes.BUILDER_CONFIGS else config
  builder = tfds.builder(shapes.NAME, config=arg, data_dir=data_dir)
  if _is_prepared(builder):
    return builder
  start = time.time()
  try:
    with _quiet_tfds():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception:
    # Processes sharing a file system race to prepare it; losing the race is fine.
    if not _is_prepared(builder):
      raise
  num = sum(config.num_examples(split) for split in shapes.SPLITS)
  print(f'Rendered {shapes.NAME}/{config.name} ({num} examples) into {builder.data_dir} '
        f'in {time.time() - start:.1f} s', flush=True)
  return tfds.builder(shapes.NAME, config=arg, data_dir=data_dir)


def _available_configs(name: str, data_dir: str) -> list[str] | None:
  """Config names of a registered builder, or of one prepared under data_dir; None if
  neither is known."""
  try:
    return sorted(tfds.builder_cls(name).builder_configs)
  except tfds.core.registered.DatasetNotFoundError:
    directory = os.path.join(data_dir, name)
    if not tf.io.gfile.isdir(directory):
      return None
    return sorted(d.rstrip('/') for d in tf.io.gfile.listdir(directory)
                  if not d.startswith('.') and not d[:1].isdigit())


def _prepared_builder(name: str, builder_config: str,
                      data_dir: str) -> tfds.core.DatasetBuilder:
  how = (f'Prepare it where there is network with `tfds build {name} --data_dir '
         f'{data_dir}`{f" --config {builder_config}" if builder_config else ""}, or point '
         'config.data.data_dir (or $MMFUSION_DATA_DIR) at a directory that holds it.')
  available = _available_configs(name, data_dir)
  if builder_config and available is not None and builder_config.split(':')[0] not in available:
    raise ValueError(f'Dataset {name!r} has no builder_config {builder_config!r}; '
                     f'available: {available}')
  try:
    builder = tfds.builder(name, config=builder_config or None, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(f'Dataset {name!r} is neither registered nor prepared under '
                            f'{data_dir}. {how}') from None
  if not _is_prepared(builder):
    variant = builder.builder_config.name if builder.builder_config else 'no config'
    raise FileNotFoundError(f'Dataset {name!r} ({variant}, version {builder.version}) is '
                            f'not prepared under {data_dir}. {how}')
  return builder


def class_names(config: Any) -> list[str]:
  """Names of the dataset's `label` classes (the zero-shot prompts' words)."""
  features = get_builder(config.data).info.features
  label = features['label'] if 'label' in features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'Dataset {config.data.name!r} has no ClassLabel feature "label"; '
                     f'its features: {sorted(features.keys())}')
  return list(label.names)


def _where(builder: tfds.core.DatasetBuilder) -> str:
  return f'{builder.name}/{builder.builder_config.name if builder.builder_config else ""}'


def _num_texts(feature: Any) -> int:
  """1 for a Text feature, K for a Sequence of Text of fixed length K, else 0."""
  if isinstance(feature, tfds.features.Text):
    return 1
  if (isinstance(feature, tfds.features.Sequence)
      and isinstance(feature.feature, tfds.features.Text) and feature.shape[0]):
    return feature.shape[0]
  return 0


def _check_features(builder: tfds.core.DatasetBuilder) -> int:
  """Checks the features the pipeline reads; returns K, the captions per example."""
  features = builder.info.features
  if not isinstance(features['image'] if 'image' in features else None,
                    tfds.features.Image):
    raise ValueError(f'Dataset {_where(builder)} needs an Image feature "image"; it has '
                     f'{sorted(features.keys())}')
  captions = features['captions'] if 'captions' in features else None
  num_captions = _num_texts(captions)
  if not num_captions:
    raise ValueError(f'Dataset {_where(builder)} needs a "captions" feature: Text, or a '
                     f'Sequence of Text with a fixed length; it has {captions!r}')
  return num_captions


def _num_questions(builder: tfds.core.DatasetBuilder) -> int:
  """Q, the question-answer pairs per example; 0 when the dataset has none.

  Pairs are a "questions" and an "answers" feature, each Text or a Sequence of Text of the
  same fixed length.
  """
  features = builder.info.features
  if 'questions' not in features or 'answers' not in features:
    return 0
  num = _num_texts(features['questions'])
  return num if num == _num_texts(features['answers']) else 0


def _require_questions(builder: tfds.core.DatasetBuilder, why: str) -> int:
  num = _num_questions(builder)
  if not num:
    features = builder.info.features
    raise ValueError(
        f'{why} needs question-answer pairs, but dataset {_where(builder)} has no "questions" '
        'and "answers" features of the same fixed length (Text, or a Sequence of Text); '
        f'its features: {sorted(features.keys())}')
  return num


def _object_attributes(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Which of colour/shape/size the dataset's `objects` (a Sequence of dicts) has as
  ClassLabels; [] without objects."""
  features = builder.info.features
  objects = features['objects'] if 'objects' in features else None
  if not (isinstance(objects, tfds.features.Sequence)
          and isinstance(objects.feature, tfds.features.FeaturesDict)):
    return []
  fields = objects.feature
  return [name for name in _OBJECT_ATTRIBUTES
          if name in fields.keys() and isinstance(fields[name], tfds.features.ClassLabel)]


def _read(builder: tfds.core.DatasetBuilder, split: Any,
          keys: Iterable[str]) -> tf.data.Dataset:
  """Examples of `split` in file order, as dicts of `keys`, images left encoded."""
  keys = sorted(set(keys))
  # Not tfds.decode.PartialDecoding: it logs a deprecation warning on every call.
  ds = builder.as_dataset(
      split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(lambda ex: {k: ex[k] for k in keys})


def _base_split(split: str) -> str:
  """'train[:90%]' -> 'train' (the tokenizer is trained on, and named after, whole splits)."""
  return re.split(r'[\[+]', split, maxsplit=1)[0].strip()


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


# ----------------------------------------------------------- tokenizer, answer vocabulary


def _cache_path(config: Any, builder: tfds.core.DatasetBuilder, suffix: str) -> str:
  """<data_dir>/tokenizers/<dataset>_<config>_<version>_<suffix>: what is derived from a
  dataset's train split and reused by every run on it."""
  builder_config = builder.builder_config.name if builder.builder_config else 'default'
  return os.path.join(resolve_data_dir(config.data), 'tokenizers',
                      f'{builder.name}_{builder_config}_{builder.version}_{suffix}')


def get_tokenizer(config: Any) -> tokenizer_lib.Tokenizer:
  """config.tokenizer.model if set; else one trained on the train split's captions,
  cached under <data_dir>/tokenizers/ and reused."""
  if config.tokenizer.model:
    path = os.path.expanduser(config.tokenizer.model)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'config.tokenizer.model: sentencepiece model not found: {path}')
    return tokenizer_lib.Tokenizer(path)
  builder = get_builder(config.data)
  vocab_size = config.tokenizer.vocab_size
  path = _cache_path(config, builder, f'v{vocab_size}.model')
  if not tf.io.gfile.exists(path):
    split = _base_split(config.data.train_split)
    tokenizer_lib.train_tokenizer(_caption_texts(builder, split), path, vocab_size)
  return tokenizer_lib.Tokenizer(path)


def _caption_texts(builder: tfds.core.DatasetBuilder, split: str) -> Iterator[str]:
  """Every caption of every example of `split`, in file order."""
  _check_features(builder)
  ds = _read(builder, split, ['captions']).map(lambda ex: tf.reshape(ex['captions'], [-1]))
  for captions in ds.unbatch().batch(4096).as_numpy_iterator():
    yield from (c.decode('utf-8') for c in captions)


def answer_vocab(config: Any) -> list[str]:
  """The VQA answer classes: every answer of the train split's questions, sorted.

  Computed once per dataset and cached as json next to the tokenizer (under
  <data_dir>/tokenizers/), so every run and evaluation on the dataset numbers answers the
  same way. Answers outside it (in eval splits) are -1 in the batches.
  """
  builder = get_builder(config.data)
  _require_questions(builder, 'answer_vocab')
  path = _cache_path(config, builder, 'answers.json')
  if not tf.io.gfile.exists(path):
    split = _base_split(config.data.train_split)
    ds = _read(builder, split, ['answers']).map(lambda ex: tf.reshape(ex['answers'], [-1]))
    answers = set()
    for chunk in ds.unbatch().batch(4096).as_numpy_iterator():
      answers.update(a.decode('utf-8') for a in chunk)
    tf.io.gfile.makedirs(os.path.dirname(path))
    # Written next to the target then renamed, like the tokenizer: processes that compute
    # the same vocabulary at once never leave half a file.
    tmp_path = f'{path}.tmp-{os.getpid()}'
    with tf.io.gfile.GFile(tmp_path, 'w') as f:
      json.dump(sorted(answers), f)
    tf.io.gfile.rename(tmp_path, path, overwrite=True)
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _answer_table(config: Any) -> tf.lookup.StaticHashTable:
  """Answer string -> int32 index in `answer_vocab`, -1 for answers outside it."""
  vocab = answer_vocab(config)
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(vocab, tf.string),
                                          tf.range(len(vocab), dtype=tf.int32)),
      default_value=-1)


# ---------------------------------------------------------------------------- training


def _host_batch_size(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={batch_size} is not divisible by the number of '
                     f'processes ({jax.process_count()})')
  return batch_size // jax.process_count()


def _train_split(config: Any) -> Any:
  # Equal parts on every host, so every host runs the same number of steps per epoch.
  return tfds.split_for_jax_process(config.data.train_split, drop_remainder=True)


def steps_per_epoch(config: Any) -> int:
  """Full host-local batches in the host's part of the train split (the rest is dropped)."""
  builder = get_builder(config.data)
  return _steps_per_epoch(builder.info.splits[_train_split(config)].num_examples, config)


def _steps_per_epoch(num: int, config: Any) -> int:
  steps = num // _host_batch_size(config.batch_size)
  if steps == 0:
    raise ValueError(f'{config.data.name} split {config.data.train_split!r} has {num} '
                     f'examples per process, fewer than one host batch '
                     f'({_host_batch_size(config.batch_size)})')
  return steps


def _standardize(example_id: tf.Tensor, ex: Mapping[str, tf.Tensor],
                 answer_table: tf.lookup.StaticHashTable | None = None,
                 ) -> dict[str, tf.Tensor]:
  out = {'id': example_id, 'image': ex['image'],
         'captions': tf.reshape(ex['captions'], [-1])}      # [K] strings
  if 'label' in ex:
    out['label'] = tf.cast(ex['label'], tf.int32)
  if 'questions' in ex:
    out['questions'] = tf.reshape(ex['questions'], [-1])                    # [Q] strings
    out['answers'] = answer_table.lookup(tf.reshape(ex['answers'], [-1]))   # [Q] int32
  return out


def _decoded_batches(ds: tf.data.Dataset, builder: tfds.core.DatasetBuilder,
                     image_size: int, batch_size: int,
                     drop_remainder: bool = False) -> tf.data.Dataset:
  """Batches of examples whose `image` is decoded and resized: uint8 [B, S, S, 3]."""
  height, width = builder.info.features['image'].shape[:2]

  def decode(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = preprocess.decode_image(ex['image'])
    if height and width:
      return {**ex, 'image': tf.ensure_shape(image, (height, width, 3))}
    return {**ex, 'image': preprocess.resize_image(image, image_size)}

  def resize(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {**batch, 'image': preprocess.resize_image(batch['image'], image_size)}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if height and width:
    # Images of one known size are resized a batch at a time: 3x faster than one by one.
    ds = ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE)
  return ds


def _pick(u: tf.Tensor, num: int) -> tf.Tensor:
  """Uniform numbers [B] in [0, 1) -> indices [B] in [0, num)."""
  return tf.minimum(tf.cast(u * num, tf.int32), num - 1)


def _finish_train_batch(batch: dict[str, tf.Tensor], random_nr: tf.Tensor,
                        num_captions: int, augment: bool) -> dict[str, tf.Tensor]:
  """Picks one caption (and question) per example, jitters colours, normalises.

  random_nr: [N, R], R = _NUM_RANDOM, plus one column for the question choice when the
  batch has questions. Batches with tokenized captions get `text`/`text_mask`; batches of
  caption strings get `caption` [B], tokenized on the host side (see `_tokenize_on_host`).
  Likewise `question`/`question_mask` or `question_string` [B], and `answer` [B].
  """
  u = tf.gather(random_nr, batch['id'])                                  # [B, R]
  choice = _pick(u[:, 0], num_captions)
  images = preprocess.to_unit_range(batch['image'])
  if augment:
    images = preprocess.colour_jitter(images, u[:, 1:_NUM_RANDOM])
  out = {'image': preprocess.normalize(images)}
  if 'caption_ids' in batch:
    out['text'] = tf.gather(batch['caption_ids'], choice, batch_dims=1)      # [B, L]
    out['text_mask'] = tf.gather(batch['caption_mask'], choice, batch_dims=1)
  else:
    out['caption'] = tf.gather(batch['captions'], choice, batch_dims=1)      # [B]
  if 'label' in batch:
    out['label'] = batch['label']
  if 'answers' in batch:
    question = _pick(u[:, _NUM_RANDOM], batch['answers'].shape[1])         # Q is static
    out['answer'] = tf.gather(batch['answers'], question, batch_dims=1)     # [B]
    if 'question_ids' in batch:
      out['question'] = tf.gather(batch['question_ids'], question, batch_dims=1)   # [B, L]
      out['question_mask'] = tf.gather(batch['question_ids_mask'], question, batch_dims=1)
    else:
      out['question_string'] = tf.gather(batch['questions'], question, batch_dims=1)
  return out


def _tokenize_on_host(batches: Iterable[dict[str, np.ndarray]], key: str,
                      out_keys: tuple[str, str], tokenizer: tokenizer_lib.Tokenizer,
                      max_len: int) -> Iterator[dict[str, np.ndarray]]:
  """Replaces strings batch[key] [B, ...] by tokens and mask [B, ..., max_len].

  Done here rather than with Tokenizer.tf_encode in tf.data: a Python function still
  running in a tf.data thread when its iterator is dropped (at exit, on an exception) can
  deadlock the process. So no tf.data pipeline here runs Python code.
  """
  for batch in batches:
    texts = batch.pop(key)
    ids, mask = tokenizer.encode([t.decode('utf-8') for t in texts.reshape(-1)], max_len)
    batch[out_keys[0]] = ids.reshape(*texts.shape, max_len)
    batch[out_keys[1]] = mask.reshape(*texts.shape, max_len)
    yield batch


def _load_in_memory(source: tf.data.Dataset, builder: tfds.core.DatasetBuilder,
                    image_size: int, tokenizer: tokenizer_lib.Tokenizer,
                    max_len: int) -> dict[str, tf.Tensor]:
  """Every example decoded, resized and tokenized (all its captions, and questions when
  read), as tensors with a leading [N] axis (row i is example id i)."""
  ds = _decoded_batches(source, builder, image_size, _LOAD_CHUNK)
  chunks = _deterministic(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator()
  chunks = _tokenize_on_host(chunks, 'captions', ('caption_ids', 'caption_mask'), tokenizer,
                             max_len)
  if 'questions' in ds.element_spec:
    chunks = _tokenize_on_host(chunks, 'questions', ('question_ids', 'question_ids_mask'),
                               tokenizer, max_len)
  chunks = list(chunks)
  return {k: tf.constant(np.concatenate([c[k] for c in chunks]))
          for k in chunks[0] if k != 'id'}


def _epoch_seed(config: Any, epoch: tf.Tensor) -> tf.Tensor:
  base = tf.constant([config.seed, jax.process_index()], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, epoch, alg='philox')


def _train_dataset(config: Any, tokenizer: tokenizer_lib.Tokenizer,
                   start_step: int) -> tf.data.Dataset:
  """Host-local training batches for steps start_step, start_step + 1, ... (infinite);
  see `local_train_batches` (which tokenizes the `caption` and `question_string` of
  streamed data).

  A host's data that fit in memory once resized are decoded once and each epoch is a
  stateless random permutation of them (a full shuffle). Larger data stream through a
  shuffle buffer of config.data.shuffle_buffer examples, seeded per epoch; that order
  also depends on TensorFlow's global seed, so leave `tf.random.set_seed` alone.
  """
  builder = get_builder(config.data)
  num_captions = _check_features(builder)
  host_batch = _host_batch_size(config.batch_size)
  split = _train_split(config)
  num = builder.info.splits[split].num_examples
  epoch_steps = _steps_per_epoch(num, config)
  first_epoch, first_offset = divmod(start_step, epoch_steps)
  size, max_len = config.data.image_size, config.tokenizer.max_len
  keys = ['image', 'captions'] + (['label'] if 'label' in builder.info.features else [])
  answer_table = None
  if set(QUESTION_INPUTS) & set(config.data.inputs):
    _require_questions(builder, f'config.data.inputs = {tuple(config.data.inputs)}')
    keys += ['questions', 'answers']
    answer_table = _answer_table(config)
  source = _read(builder, split, keys).enumerate().map(
      lambda i, ex: _standardize(i, ex, answer_table))
  in_memory = num * size * size * 3 <= _IN_MEMORY_LIMIT_BYTES
  if in_memory:
    examples = _load_in_memory(source, builder, size, tokenizer, max_len)

  def epoch_ids(e: tf.Tensor) -> tf.data.Dataset:
    """The shuffled example ids of epoch e, batched, from the resume point on."""
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64), _epoch_seed(config, e), alg='philox')
    skip = tf.where(e == first_epoch, first_offset, 0) * host_batch
    return tf.data.Dataset.from_tensor_slices(perm[skip:epoch_steps * host_batch])

  def epoch_examples(e: tf.Tensor) -> tf.data.Dataset:
    shuffle_seed = tf.random.stateless_uniform(
        [], _epoch_seed(config, e), minval=None, maxval=None, dtype=tf.int64, alg='philox')
    ds = source.shuffle(min(config.data.shuffle_buffer, num), seed=shuffle_seed,
                        reshuffle_each_iteration=False)
    ds = ds.skip(tf.cast(tf.where(e == first_epoch, first_offset, 0) * host_batch, tf.int64))
    return _decoded_batches(ds, builder, size, host_batch, drop_remainder=True)

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    # One row of random numbers per example id: the same example gets the same caption
    # and jitter in an epoch however the run was resumed.
    random_nr = tf.random.stateless_uniform(
        [num, _NUM_RANDOM],
        tf.random.experimental.stateless_fold_in(_epoch_seed(config, e), 1, alg='philox'),
        alg='philox')
    if answer_table is not None:
      # The question choice is a column of its own, drawn from a seed of its own: widening
      # the draw above would change every caption choice and jitter, so runs without
      # questions keep exactly the batches they had.
      question_nr = tf.random.stateless_uniform(
          [num, 1],
          tf.random.experimental.stateless_fold_in(_epoch_seed(config, e), 2, alg='philox'),
          alg='philox')
      random_nr = tf.concat([random_nr, question_nr], axis=1)
    if in_memory:
      ds = epoch_ids(e).batch(host_batch).map(
          lambda ids: {'id': ids, **{k: tf.gather(v, ids) for k, v in examples.items()}})
    else:
      ds = epoch_examples(e)
    return ds.map(lambda b: _finish_train_batch(b, random_nr, num_captions,
                                                config.data.augment),
                  num_parallel_calls=tf.data.AUTOTUNE)

  first = tf.constant(first_epoch, tf.int64)
  ds = tf.data.Dataset.range(first, np.iinfo(np.int64).max).flat_map(epoch)
  return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def _leading_axis_sharding(
    batch_sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
  """The batch sharding with only its first entry kept, valid for arrays of any rank."""
  spec = batch_sharding.spec
  return jax.sharding.NamedSharding(
      batch_sharding.mesh, jax.sharding.PartitionSpec(spec[0] if len(spec) else None))


class _Failure:
  """An exception raised by the producer thread, carried to the consumer to be re-raised."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _prefetch(iterator: Iterator[Any], size: int) -> Iterator[Any]:
  """Items of `iterator` in order, produced on a background thread that keeps up to `size`
  ready (here: batches already transferred to device).

  The host work of the next batches (tf.data, tokenization, the copy to device) overlaps the
  running step instead of sitting between steps; the trainer's data_wait_fraction measures
  what is left. An error in the producer is re-raised in the consumer at the same position.
  Closing the consumer stops the thread.
  """
  if size <= 0:
    yield from iterator
    return
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
      put(_Failure(e))

  thread = threading.Thread(target=produce, name='mmfusion-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join(timeout=10)


def local_train_batches(config: Any, tokenizer: tokenizer_lib.Tokenizer,
                        start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Host-local numpy training batches for steps start_step, start_step + 1, ...

  Keys: image f32 [b, S, S, 3] in [-1, 1], text i32 [b, L], text_mask bool [b, L],
  label i32 [b] (when the dataset has labels), with b = batch_size / process_count.
  When config.data.inputs names any of QUESTION_INPUTS, also one of each example's
  questions per epoch: question i32 [b, L], question_mask bool [b, L] and answer i32 [b],
  its answer's index in `answer_vocab` (-1 if not in it).
  """
  ds = _train_dataset(config, tokenizer, start_step)
  batches = ds.as_numpy_iterator()
  if 'caption' in ds.element_spec:
    batches = _tokenize_on_host(batches, 'caption', ('text', 'text_mask'), tokenizer,
                                config.tokenizer.max_len)
  if 'question_string' in ds.element_spec:
    batches = _tokenize_on_host(batches, 'question_string', ('question', 'question_mask'),
                                tokenizer, config.tokenizer.max_len)
  return batches


def train_iterator(config: Any, tokenizer: tokenizer_lib.Tokenizer,
                   batch_sharding: jax.sharding.NamedSharding,
                   start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Global training batches for steps start_step, start_step + 1, ... (infinite).

  Keys: image f32 [B, S, S, 3] in [-1, 1], text i32 [B, L], text_mask bool [B, L],
  label i32 [B], and question i32 [B, L], question_mask bool [B, L], answer i32 [B] when
  config.data.inputs asks for them (see `local_train_batches`); B = config.batch_size,
  sharded over the leading axis by batch_sharding.
  """
  sharding = _leading_axis_sharding(batch_sharding)
  batches = ({k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}
             for b in local_train_batches(config, tokenizer, start_step))
  return _prefetch(batches, config.data.prefetch)


# -------------------------------------------------------------------------- evaluation


def _keep_if_predicate(builder: tfds.core.DatasetBuilder, keep_if: Mapping[str, Any]):
  """{'num_objects': 1} -> a tf predicate on examples; checks the features exist."""
  features = builder.info.features
  scalars = sorted(k for k in features.keys() if features[k].shape == ())
  wanted = {}
  for key, value in keep_if.items():
    if key not in scalars:
      raise ValueError(f'keep_if: {key!r} is not a scalar feature of {builder.name}; '
                       f'scalar features: {scalars}')
    if isinstance(features[key], tfds.features.ClassLabel) and isinstance(value, str):
      value = features[key].str2int(value)
    wanted[key] = value

  def predicate(ex: Mapping[str, tf.Tensor]) -> tf.Tensor:
    keep = tf.constant(True)
    for key, value in wanted.items():
      keep = tf.logical_and(keep, tf.equal(ex[key], tf.cast(value, ex[key].dtype)))
    return keep
  return predicate


def _count(builder: tfds.core.DatasetBuilder, split: Any, keep_if: Mapping[str, Any]) -> int:
  if not keep_if:
    return builder.info.splits[split].num_examples
  ds = _read(builder, split, keep_if.keys()).filter(_keep_if_predicate(builder, keep_if))
  return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def num_examples(config: Any, split: str, keep_if: Mapping[str, Any] | None = None) -> int:
  """Examples of `split` (all processes together) that pass keep_if."""
  return _count(get_builder(config.data), split, keep_if or {})


def eval_batches(config: Any, split: str, tokenizer: tokenizer_lib.Tokenizer,
                 batch_size: int, keep_if: Mapping[str, Any] | None = None,
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Host-local evaluation batches of `split` in file order, no augmentation.

  Keys: image f32 [B, S, S, 3], captions i32 [B, K, L], captions_mask bool [B, K, L],
  label i32 [B] and num_objects i32 [B] (when the dataset has them), and _valid bool [B].
  Datasets with question-answer pairs add questions i32 [B, Q, L], questions_mask bool
  [B, Q, L] and answers i32 [B, Q] (index in `answer_vocab`, -1 outside it); datasets with
  `objects` add object_colour, object_shape, object_size i32 [B, 2] (those it has: ClassLabel
  indices of the first two objects, -1 where there is no such object).
  The last batch is padded (with zeros and _valid False) to batch_size, and with several
  processes every process yields the same number of batches. keep_if={'feature': value}
  keeps the examples whose scalar feature equals value.
  """
  builder = get_builder(config.data)
  _check_features(builder)
  keep_if = dict(keep_if or {})
  predicate = _keep_if_predicate(builder, keep_if)
  extra = [k for k in ('label', 'num_objects') if k in builder.info.features]
  read = ['image', 'captions', *extra, *keep_if]
  answer_table = None
  if _num_questions(builder):
    read += ['questions', 'answers']
    answer_table = _answer_table(config)
  attributes = _object_attributes(builder)
  if attributes:
    read.append('objects')
  splits = tfds.even_splits(split, n=jax.process_count())
  num_batches = 0   # with one process the data's own end is everyone's end
  if len(splits) > 1:
    num_batches = max(math.ceil(_count(builder, s, keep_if) / batch_size) for s in splits)
  size, max_len = config.data.image_size, config.tokenizer.max_len

  def standardize(ex: dict[str, Any]) -> dict[str, Any]:
    out = {**ex, 'captions': tf.reshape(ex['captions'], [-1])}          # [K] strings
    if answer_table is not None:
      out['questions'] = tf.reshape(ex['questions'], [-1])              # [Q] strings
      out['answers'] = answer_table.lookup(tf.reshape(ex['answers'], [-1]))
    if attributes:
      objects = out.pop('objects')           # a dict of [num_objects] ClassLabel indices
      for name in attributes:
        first = tf.cast(objects[name][:_EVAL_OBJECTS], tf.int32)
        first = tf.pad(first, [[0, _EVAL_OBJECTS - tf.shape(first)[0]]], constant_values=-1)
        out[f'object_{name}'] = tf.ensure_shape(first, [_EVAL_OBJECTS])
    return out

  passed = ((['questions', 'answers'] if answer_table is not None else [])
            + [f'object_{name}' for name in attributes])    # kept as they are by `prepare`

  def prepare(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {'image': preprocess.normalize(preprocess.to_unit_range(batch['image'])),
           'captions': batch['captions']}
    out.update({k: tf.cast(batch[k], tf.int32) for k in extra})
    out.update({k: batch[k] for k in passed})
    return out

  ds = _read(builder, splits[jax.process_index()], read)
  ds = ds.filter(predicate).map(standardize)
  ds = _decoded_batches(ds, builder, size, batch_size).map(prepare)
  ds = _deterministic(ds.prefetch(tf.data.AUTOTUNE))
  # A batch of no examples, the template of the all-padding batches.
  empty = {k: np.zeros((0, *v.shape[1:]), v.dtype.as_numpy_dtype)
           for k, v in ds.element_spec.items()}
  batches = _tokenize_on_host(itertools.chain([empty], ds.as_numpy_iterator()), 'captions',
                              ('captions', 'captions_mask'), tokenizer, max_len)
  if answer_table is not None:
    batches = _tokenize_on_host(batches, 'questions', ('questions', 'questions_mask'),
                                tokenizer, max_len)
  return _padded(batches, batch_size, num_batches)


def _padded(batches: Iterator[dict[str, np.ndarray]], batch_size: int,
            num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """The first of `batches` is empty, a template; the others are padded to batch_size
  and followed by all-padding batches up to num_batches."""
  empty = next(batches)
  yielded = 0
  for batch in batches:
    yield _pad_batch(batch, batch_size)
    yielded += 1
  for _ in range(yielded, num_batches):   # other processes still have batches
    yield _pad_batch(empty, batch_size)


def _pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads every array to batch_size rows with zeros; `_valid` marks the real rows."""
  num = len(next(iter(batch.values())))
  out = {}
  for key, value in batch.items():
    out[key] = np.zeros((batch_size, *value.shape[1:]), value.dtype)
    out[key][:num] = value
  out['_valid'] = np.arange(batch_size) < num
  return out
