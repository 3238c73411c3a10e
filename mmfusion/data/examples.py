"""A split's first examples as plain Python / numpy values, for notebooks and the public API:
images decoded to uint8 [H, W, 3], texts as str, audio as int16 or float waveforms, and every
scalar feature (label, num_objects, ...). Not a training or evaluation path: those batch and
preprocess through the input ops (data/ops.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mmfusion.data import image as image_lib


def read(source: Any, split: str, n: int | None = None,
         keep_if: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """{feature: values} of the first n examples of `split` that pass keep_if (all if n is None).

  Images come as one uint8 array [N, H, W, 3] when they share a size (else a list), texts as
  str (lists of str for sequences), audio as a list of waveforms (int16 at the feature's
  sample rate), `objects` (a sequence of dicts) as a list of per-object {attribute: value}
  dicts; other features as numpy arrays.
  """
  features = source.features
  if split not in source.builder.info.splits:
    raise ValueError(f'dataset {source.where} has no split {split!r}; it has '
                     f'{sorted(source.builder.info.splits)}.')
  if n is not None and n < 0:
    raise ValueError(f'n must be >= 0 or None, got {n}.')
  keys = list(features.keys())
  ds = source.read(split, keys)
  if keep_if:
    ds = ds.filter(source.keep_if(keep_if))
  if n is not None:
    ds = ds.take(n)
  rows: dict[str, list[Any]] = {k: [] for k in keys}
  for ex in tfds.as_numpy(ds):
    for k in keys:
      rows[k].append(_plain(features[k], ex[k]))
  out: dict[str, Any] = {}
  for k, values in rows.items():
    if isinstance(features[k], tfds.features.Image):
      same = len({v.shape for v in values}) <= 1
      out[k] = np.stack(values) if values and same else values
    elif isinstance(features[k], (tfds.features.Text, tfds.features.Sequence,
                                  tfds.features.Audio)):
      out[k] = values          # ragged: one entry per example
    else:
      out[k] = np.asarray(values)
  return out


def _plain(feature: Any, value: Any) -> Any:
  if isinstance(feature, tfds.features.Image):
    return image_lib.decode_image(tf.constant(value)).numpy()
  if isinstance(feature, tfds.features.Text):
    return value.decode('utf-8')
  if isinstance(feature, tfds.features.Sequence):
    inner = feature.feature
    if isinstance(inner, tfds.features.Text):
      return [v.decode('utf-8') for v in value]
    if isinstance(inner, tfds.features.FeaturesDict):
      return [{k: _name(inner[k], v[i]) for k, v in value.items()}
              for i in range(len(next(iter(value.values()))))]
  if isinstance(feature, tfds.features.ClassLabel):
    return int(value)
  return value


def _name(feature: Any, value: Any) -> Any:
  if isinstance(feature, tfds.features.ClassLabel):
    return feature.int2str(int(value))
  return value.item() if hasattr(value, 'item') else value
