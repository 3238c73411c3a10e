"""Evaluation batches: a split's examples in file order through the ops' evaluation view, padded
to a fixed batch size and masked, the same number of batches on every host.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mmfusion.data import ops as ops_lib
from mmfusion.data import sources


def batches(source: sources.Source, split: str, inputs: Sequence[str], batch_size: int,
            keep_if: Mapping[str, Any] | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local evaluation batches of `split` in file order, no augmentation.

  Keys: the evaluation entries of every op in `inputs` (an op with several items per example
  keeps them all: text [B, K, L], question [B, Q, L], answer [B, Q]), the features named in
  keep_if (int32 [B]), and _valid bool [B]. The last batch is padded (with zeros and _valid
  False) to batch_size, and with several processes every process yields the same number of
  batches. keep_if={'feature': value} keeps the examples whose scalar feature equals value.
  """
  ops = ops_lib.build(source, inputs)
  keep_if = dict(keep_if or {})
  predicate = source.keep_if(keep_if)
  features = sorted({f for op in ops.values() for f in op.features()} | set(keep_if))
  splits = tfds.even_splits(split, n=jax.process_count())
  num_batches = 0   # with one process the data's own end is everyone's end
  if len(splits) > 1:
    num_batches = max(math.ceil(source.count(s, keep_if) / batch_size) for s in splits)

  def standardize(ex):
    return {**{k: tf.cast(ex[k], tf.int32) for k in keep_if},
            **ops_lib.standardize(ops, ex)}

  def view(batch):
    return {**{k: batch[k] for k in keep_if}, **ops_lib.apply(ops, 'eval', batch)}

  ds = source.read(splits[jax.process_index()], features).filter(predicate).map(standardize)
  ds = ds.map(lambda ex: ops_lib.apply(ops, 'decode', ex), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).map(lambda b: ops_lib.apply(ops, 'decode_batch', b),
                                num_parallel_calls=tf.data.AUTOTUNE)
  ds = sources.deterministic(ds.map(view).prefetch(tf.data.AUTOTUNE))
  kept = {k for op in ops.values() for k in op.keys()} | set(keep_if)
  # A batch of no examples, the template of the all-padding batches.
  empty = {k: np.zeros((0, *v.shape[1:]), v.dtype.as_numpy_dtype)
           for k, v in ds.element_spec.items()}
  processed = ({k: v for k, v in ops_lib.apply(ops, 'host', b).items() if k in kept}
               for b in itertools.chain([empty], ds.as_numpy_iterator()))
  return _padded(processed, batch_size, num_batches)


def _padded(batches: Iterator[dict[str, np.ndarray]], batch_size: int,
            num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """The first of `batches` is empty, a template; the others are padded to batch_size
  and followed by all-padding batches up to num_batches."""
  empty = next(batches)
  yielded = 0
  for batch in batches:
    yield pad_batch(batch, batch_size)
    yielded += 1
  for _ in range(yielded, num_batches):   # other processes still have batches
    yield pad_batch(empty, batch_size)


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads every array to batch_size rows with zeros; `_valid` marks the real rows."""
  num = len(next(iter(batch.values())))
  out = {}
  for key, value in batch.items():
    out[key] = np.zeros((batch_size, *value.shape[1:]), value.dtype)
    out[key][:num] = value
  out['_valid'] = np.arange(batch_size) < num
  return out
