"""The training stream: TFDS -> tf.data (each host reads its own part) -> host-local numpy
batches -> global jax.Arrays (`sharding.host_to_global`), exactly resumable.

Training order is a pure function of (config.seed, step, data config, process count): epoch
e = step // steps_per_epoch is a shuffle of the host's examples seeded by (seed, process, e),
with the last partial batch dropped. Each input op's random choices (caption choice, colour
jitter, question choice) come from stateless random numbers indexed by (seed, process, e,
example id) and by the op's name, so adding or removing an input never changes another's.
Resuming at step s skips s % steps_per_epoch batches of epoch e before the per-batch work:
datasets whose decoded examples fit in memory are decoded once per run, larger ones are decoded
after the skip, so resuming never decodes what it skips.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mmfusion import sharding
from mmfusion.data import ops as ops_lib
from mmfusion.data import prefetch as prefetch_lib
from mmfusion.data import sources

# A host's training examples are decoded once and kept in memory when they fit in this many
# bytes; larger datasets are decoded anew each epoch.
IN_MEMORY_LIMIT_BYTES = 2 << 30
_LOAD_CHUNK = 1024              # examples per batch when loading into memory


def host_batch_size(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={batch_size} is not divisible by the number of '
                     f'processes ({jax.process_count()})')
  return batch_size // jax.process_count()


def _split(config: Any) -> Any:
  # Equal parts on every host, so every host runs the same number of steps per epoch.
  return tfds.split_for_jax_process(config.data.train_split, drop_remainder=True)


def steps_per_epoch(source: sources.Source) -> int:
  """Full host-local batches in the host's part of the train split (the rest is dropped)."""
  try:
    num = source.num_examples(_split(source.config))
  except (KeyError, ValueError) as e:
    raise ValueError(f'config.data.train_split = {source.config.data.train_split!r}: '
                     f'{str(e).splitlines()[0]} (dataset {source.where}).') from None
  return _steps_per_epoch(num, source.config)


def _steps_per_epoch(num: int, config: Any) -> int:
  steps = num // host_batch_size(config.batch_size)
  if steps == 0:
    raise ValueError(f'config.batch_size = {config.batch_size}: the train split '
                     f'{config.data.train_split!r} of {config.data.name} has {num} examples per '
                     f'process, fewer than one batch ({host_batch_size(config.batch_size)} per '
                     'process); lower config.batch_size.')
  return steps


def _epoch_seed(config: Any, epoch: tf.Tensor) -> tf.Tensor:
  base = tf.constant([config.seed, jax.process_index()], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, epoch, alg='philox')


def _random_numbers(config: Any, epoch: tf.Tensor, op: ops_lib.Op, num: int) -> tf.Tensor:
  """[num, op.num_random] uniform numbers of epoch `epoch`, one row per example id, from a
  stream of the op's own (its name's CRC-32 folded into the epoch's seed)."""
  stream = zlib.crc32(op.name.encode('utf-8'))
  seed = tf.random.experimental.stateless_fold_in(_epoch_seed(config, epoch), stream,
                                                  alg='philox')
  return tf.random.stateless_uniform([num, op.num_random], seed, alg='philox')


def _load_in_memory(source_ds: tf.data.Dataset, ops: Mapping[str, ops_lib.Op]
                    ) -> dict[str, tf.Tensor]:
  """Every example decoded and host-processed (e.g. all its captions tokenized), as tensors
  with a leading [N] axis (row i is example id i)."""
  ds = source_ds.map(lambda ex: ops_lib.apply(ops, 'decode', ex),
                     num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(_LOAD_CHUNK).map(lambda b: ops_lib.apply(ops, 'decode_batch', b),
                                 num_parallel_calls=tf.data.AUTOTUNE)
  chunks = [ops_lib.apply(ops, 'host', chunk) for chunk in
            sources.deterministic(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator()]
  return {k: tf.constant(np.concatenate([c[k] for c in chunks])) for k in chunks[0] if k != 'id'}


def dataset(source: sources.Source, ops: Mapping[str, ops_lib.Op],
            start_step: int) -> tf.data.Dataset:
  """Host-local training batches for steps start_step, start_step + 1, ... (infinite), before
  the ops' host stage (`local_batches` runs it).

  A host's data that fit in memory once decoded are decoded once and each epoch is a stateless
  random permutation of them (a full shuffle). Larger data stream through a shuffle buffer of
  config.data.shuffle_buffer examples, seeded per epoch; that order also depends on
  TensorFlow's global seed, so leave `tf.random.set_seed` alone.
  """
  config = source.config
  host_batch = host_batch_size(config.batch_size)
  split = _split(config)
  num = source.num_examples(split)
  epoch_steps = _steps_per_epoch(num, config)
  first_epoch, first_offset = divmod(start_step, epoch_steps)
  features = sorted({f for op in ops.values() for f in op.features()})
  source_ds = source.read(split, features).enumerate().map(
      lambda i, ex: {'id': i, **ops_lib.standardize(ops, ex)})
  in_memory = num * sum(op.bytes_per_example() for op in ops.values()) <= IN_MEMORY_LIMIT_BYTES
  if in_memory:
    examples = _load_in_memory(source_ds, ops)

  def skipped(e: tf.Tensor) -> tf.Tensor:
    return tf.where(e == first_epoch, first_offset, 0) * host_batch

  def epoch_from_memory(e: tf.Tensor) -> tf.data.Dataset:
    """The shuffled example ids of epoch e, from the resume point on, gathered in batches."""
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64), _epoch_seed(config, e), alg='philox')
    ids = tf.data.Dataset.from_tensor_slices(perm[skipped(e):epoch_steps * host_batch])
    return ids.batch(host_batch).map(
        lambda ids: {'id': ids, **{k: tf.gather(v, ids) for k, v in examples.items()}})

  def epoch_streamed(e: tf.Tensor) -> tf.data.Dataset:
    shuffle_seed = tf.random.stateless_uniform(
        [], _epoch_seed(config, e), minval=None, maxval=None, dtype=tf.int64, alg='philox')
    ds = source_ds.shuffle(min(config.data.shuffle_buffer, num), seed=shuffle_seed,
                           reshuffle_each_iteration=False)
    ds = ds.skip(tf.cast(skipped(e), tf.int64))
    ds = ds.map(lambda ex: ops_lib.apply(ops, 'decode', ex), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(host_batch, drop_remainder=True)
    return ds.map(lambda b: ops_lib.apply(ops, 'decode_batch', b),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    # One row of random numbers per example id and op: the same example gets the same
    # caption and jitter in an epoch however the run was resumed.
    random_nr = {name: _random_numbers(config, e, op, num) for name, op in ops.items()
                 if op.num_random}

    def train_view(batch):
      out = {}
      for name, op in ops.items():
        u = tf.gather(random_nr[name], batch['id']) if op.num_random else None
        out.update(op.train(batch, u))
      return out
    ds = epoch_from_memory(e) if in_memory else epoch_streamed(e)
    return ds.map(train_view, num_parallel_calls=tf.data.AUTOTUNE)

  first = tf.constant(first_epoch, tf.int64)
  ds = tf.data.Dataset.range(first, np.iinfo(np.int64).max).flat_map(epoch)
  return sources.deterministic(ds.prefetch(tf.data.AUTOTUNE))


def local_batches(source: sources.Source, start_step: int = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Host-local numpy training batches for steps start_step, start_step + 1, ...: the entries
  of every op in config.data.inputs (see each op's `spec`), with b = batch_size /
  process_count rows."""
  ops = ops_lib.build(source, source.config.data.inputs)
  for batch in dataset(source, ops, start_step).as_numpy_iterator():
    yield ops_lib.apply(ops, 'host', batch)


def batches(source: sources.Source, batch_sharding: jax.sharding.NamedSharding,
            start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Global training batches for steps start_step, start_step + 1, ... (infinite), rows
  split over the leading axis by batch_sharding, produced config.data.prefetch ahead."""
  global_batches = (sharding.host_to_global(b, batch_sharding)
                    for b in local_batches(source, start_step))
  return prefetch_lib.prefetch(global_batches, source.config.data.prefetch)
