"""Input pipelines: TFDS -> tf.data (each host reads its own part) -> global jax.Arrays.

Owns finding (or rendering) datasets, the tokenizer cache, the exactly resumable training
iterator and the padded, masked evaluation batches.

Training order is a pure function of (config.seed, step, data config, process count):
epoch e = step // steps_per_epoch is a shuffle of the host's examples seeded by
(seed, process, e), with the last partial batch dropped; caption choice and colour jitter
come from stateless random numbers indexed by (seed, process, e, example id). Resuming at
step s skips s % steps_per_epoch batches of epoch e before the per-batch work: datasets
whose resized images fit in memory are decoded once per run, larger ones are decoded
after the skip, so resuming never decodes what it skips.
"""
from __future__ import annotations

import contextlib
import io
import itertools
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


def _check_features(builder: tfds.core.DatasetBuilder) -> int:
  """Checks the features the pipeline reads; returns K, the captions per example."""
  features = builder.info.features
  where = f'{builder.name}/{builder.builder_config.name if builder.builder_config else ""}'
  if not isinstance(features['image'] if 'image' in features else None,
                    tfds.features.Image):
    raise ValueError(f'Dataset {where} needs an Image feature "image"; it has '
                     f'{sorted(features.keys())}')
  captions = features['captions'] if 'captions' in features else None
  if isinstance(captions, tfds.features.Text):
    return 1
  if (isinstance(captions, tfds.features.Sequence)
      and isinstance(captions.feature, tfds.features.Text) and captions.shape[0]):
    return captions.shape[0]
  raise ValueError(f'Dataset {where} needs a "captions" feature: Text, or a Sequence of '
                   f'Text with a fixed length; it has {captions!r}')


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


# --------------------------------------------------------------------------- tokenizer


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
  builder_config = builder.builder_config.name if builder.builder_config else 'default'
  path = os.path.join(resolve_data_dir(config.data), 'tokenizers',
                      f'{builder.name}_{builder_config}_{builder.version}_v{vocab_size}.model')
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


def _standardize(example_id: tf.Tensor, ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  out = {'id': example_id, 'image': ex['image'],
         'captions': tf.reshape(ex['captions'], [-1])}      # [K] strings
  if 'label' in ex:
    out['label'] = tf.cast(ex['label'], tf.int32)
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


def _finish_train_batch(batch: dict[str, tf.Tensor], random_nr: tf.Tensor,
                        num_captions: int, augment: bool) -> dict[str, tf.Tensor]:
  """Picks one caption per example, jitters colours, normalises. random_nr: [N, R].

  Batches with tokenized captions get `text`/`text_mask`; batches of caption strings
  get `caption` [B], tokenized on the host side (see `_tokenize_on_host`).
  """
  u = tf.gather(random_nr, batch['id'])                                  # [B, R]
  choice = tf.minimum(tf.cast(u[:, 0] * num_captions, tf.int32), num_captions - 1)
  images = preprocess.to_unit_range(batch['image'])
  if augment:
    images = preprocess.colour_jitter(images, u[:, 1:])
  out = {'image': preprocess.normalize(images)}
  if 'caption_ids' in batch:
    out['text'] = tf.gather(batch['caption_ids'], choice, batch_dims=1)      # [B, L]
    out['text_mask'] = tf.gather(batch['caption_mask'], choice, batch_dims=1)
  else:
    out['caption'] = tf.gather(batch['captions'], choice, batch_dims=1)      # [B]
  if 'label' in batch:
    out['label'] = batch['label']
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
  """Every example decoded, resized and tokenized, as tensors with a leading [N] axis
  (row i is example id i)."""
  ds = _decoded_batches(source, builder, image_size, _LOAD_CHUNK)
  chunks = list(_tokenize_on_host(
      _deterministic(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator(), 'captions',
      ('caption_ids', 'caption_mask'), tokenizer, max_len))
  return {k: tf.constant(np.concatenate([c[k] for c in chunks]))
          for k in chunks[0] if k != 'id'}


def _epoch_seed(config: Any, epoch: tf.Tensor) -> tf.Tensor:
  base = tf.constant([config.seed, jax.process_index()], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, epoch, alg='philox')


def _train_dataset(config: Any, tokenizer: tokenizer_lib.Tokenizer,
                   start_step: int) -> tf.data.Dataset:
  """Host-local training batches for steps start_step, start_step + 1, ... (infinite);
  see `local_train_batches` (which tokenizes the `caption` of streamed data).

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
  source = _read(builder, split, keys).enumerate().map(_standardize)
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
  """
  ds = _train_dataset(config, tokenizer, start_step)
  batches = ds.as_numpy_iterator()
  if 'caption' in ds.element_spec:
    batches = _tokenize_on_host(batches, 'caption', ('text', 'text_mask'), tokenizer,
                                config.tokenizer.max_len)
  return batches


def train_iterator(config: Any, tokenizer: tokenizer_lib.Tokenizer,
                   batch_sharding: jax.sharding.NamedSharding,
                   start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Global training batches for steps start_step, start_step + 1, ... (infinite).

  Keys: image f32 [B, S, S, 3] in [-1, 1], text i32 [B, L], text_mask bool [B, L],
  label i32 [B]; B = config.batch_size, sharded over the leading axis by batch_sharding.
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
  The last batch is padded (with _valid False) to batch_size, and with several processes
  every process yields the same number of batches. keep_if={'feature': value} keeps the
  examples whose scalar feature equals value.
  """
  builder = get_builder(config.data)
  _check_features(builder)
  keep_if = dict(keep_if or {})
  predicate = _keep_if_predicate(builder, keep_if)
  extra = [k for k in ('label', 'num_objects') if k in builder.info.features]
  splits = tfds.even_splits(split, n=jax.process_count())
  num_batches = 0   # with one process the data's own end is everyone's end
  if len(splits) > 1:
    num_batches = max(math.ceil(_count(builder, s, keep_if) / batch_size) for s in splits)
  size, max_len = config.data.image_size, config.tokenizer.max_len

  def prepare(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {'image': preprocess.normalize(preprocess.to_unit_range(batch['image'])),
           'captions': batch['captions']}
    out.update({k: tf.cast(batch[k], tf.int32) for k in extra})
    return out

  ds = _read(builder, splits[jax.process_index()], ['image', 'captions', *extra, *keep_if])
  ds = ds.filter(predicate).map(
      lambda ex: {**ex, 'captions': tf.reshape(ex['captions'], [-1])})   # [K] strings
  ds = _decoded_batches(ds, builder, size, batch_size).map(prepare)
  ds = _deterministic(ds.prefetch(tf.data.AUTOTUNE))
  # A batch of no examples, the template of the all-padding batches.
  empty = {k: np.zeros((0, *v.shape[1:]), v.dtype.as_numpy_dtype)
           for k, v in ds.element_spec.items()}
  batches = _tokenize_on_host(itertools.chain([empty], ds.as_numpy_iterator()), 'captions',
                              ('captions', 'captions_mask'), tokenizer, max_len)
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
