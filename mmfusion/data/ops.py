"""Preprocessing ops keyed by modality (and by target: labels, object attributes): one registry
that the training stream, the evaluation batches and the public API all build their batches with.

`config.data.inputs` names ops; each op reads some dataset features and produces the batch
entries `<name>` (and `<name>_mask`, or other entries it declares). An op's stages run in this
order, each on whichever examples the pipeline holds at that point:

  standardize(ex)       per example, TF: dataset features -> the op's fields
  decode(ex)            per example, TF: expensive decoding (kept after a resume's skip)
  decode_batch(batch)   per batch, TF
  host(batch)           per batch, numpy on the host: Python work (e.g. tokenizing strings), kept
                        out of tf.data, where a Python function can deadlock at exit
  train(batch, u)       per batch, TF: the training view; u [B, num_random] uniform numbers,
                        the same for an example in an epoch however a run was resumed
  eval(batch)           per batch, TF: the evaluation view (no randomness)

The built-in ops register themselves: image (data/image.py), text and question (data/text.py),
label and objects (here). A new modality registers its op and needs no change elsewhere.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from mmfusion.data.tf_lazy import tf, tfds  # imported at first use


Fields = dict[str, Any]


class Op:
  """One batch entry family. Subclasses set `name`, `features` and override the stages they
  need; every stage defaults to passing the op's fields through unchanged."""
  name = ''
  num_random = 0            # uniform numbers per example the training view draws
  # feature -> the TFDS feature type it must have: a class, or its name in tfds.features (a name
  # keeps TFDS unimported until a dataset is checked).
  feature_types: dict[str, type | str] = {}

  def __init__(self, source: Any):
    self.source = source                 # data.sources.Source: config, builder, vocabularies
    self.config = source.config

  def features(self) -> tuple[str, ...]:
    """The dataset features it reads; `check` makes sure they exist."""
    return tuple(self.feature_types)

  def check(self) -> None:
    """Fails, naming the dataset and the feature, when the dataset lacks what the op reads
    or has it with another type than `feature_types` says."""
    available = self.source.features
    missing = [f for f in self.features() if f not in available.keys()]
    if missing:
      raise ValueError(f'config.data.inputs has {self.name!r}, which reads features {missing}; '
                       f'dataset {self.source.where} has {sorted(available.keys())}.')
    for feature, kind in self.feature_types.items():
      kind = getattr(tfds.features, kind) if isinstance(kind, str) else kind
      if not isinstance(available[feature], kind):
        raise ValueError(f'dataset {self.source.where}: {feature!r} is not a {kind.__name__} '
                         f'feature (input {self.name!r} reads it as one).')

  def keys(self) -> tuple[str, ...]:
    """The batch entries it produces, as `spec` declares them."""
    return tuple(self.spec(1))

  def spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Training entries: name -> (shape, numpy dtype), with a leading batch axis. Depends on
    the config alone (`training_spec` calls it before any data is read)."""
    raise NotImplementedError

  def bytes_per_example(self) -> int:
    """Host memory one example takes once decoded (decides whether a split is kept in memory)."""
    return 0

  def standardize(self, ex: Mapping[str, tf.Tensor]) -> Fields:
    return {}

  def decode(self, ex: Fields) -> Fields:
    return {}

  def decode_batch(self, batch: Fields) -> Fields:
    return {}

  def host(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {}

  def train(self, batch: Fields, u: tf.Tensor) -> Fields:
    return {k: batch[k] for k in self.keys() if k in batch}

  def eval(self, batch: Fields) -> Fields:
    return {k: batch[k] for k in self.keys() if k in batch}

  def from_raw(self, values: Any) -> dict[str, np.ndarray]:
    """Plain inputs (arrays, strings) -> the op's evaluation entries, as numpy."""
    raise NotImplementedError(f'op {self.name!r} does not take plain inputs')


REGISTRY: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
  """Class decorator: makes `cls` the op for `cls.name`."""
  REGISTRY[cls.name] = cls
  return cls


def build(source: Any, names, check: bool = True) -> dict[str, Op]:
  """The ops named by `names` (config.data.inputs, or an evaluator's), checked against the
  dataset's features (unless `check` is off: plain inputs need no dataset)."""
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise ValueError(f'config.data.inputs names {unknown}; known inputs: {sorted(REGISTRY)}.')
  ops = {n: REGISTRY[n](source) for n in names}
  for op in ops.values():
    if check:
      op.check()
  return ops


def standardize(ops: Mapping[str, Op], example: Mapping[str, Any]) -> Fields:
  """The ops' fields of one dataset example (the first stage; the raw features are dropped)."""
  out = {}
  for op in ops.values():
    out.update(op.standardize(example))
  return out


def apply(ops: Mapping[str, Op], stage: str, fields: Fields) -> Fields:
  """Runs one later stage of every op on `fields`: each op's outputs replace or add its keys,
  the other fields pass through."""
  out = dict(fields)
  for op in ops.values():
    out.update(getattr(op, stage)(fields))
  return out


class _ConfigOnly:
  def __init__(self, config: Any):
    self.config = config


def training_spec(config: Any, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The training batch config.data.inputs promises: entry -> (shape, numpy dtype), known
  before any data is read (the model is initialised and checked with it)."""
  unknown = [n for n in config.data.inputs if n not in REGISTRY]
  if unknown:
    raise ValueError(f'config.data.inputs names {unknown}; known inputs: {sorted(REGISTRY)}.')
  spec = {}
  for name in config.data.inputs:
    spec.update(REGISTRY[name](_ConfigOnly(config)).spec(batch_size))
  return spec


@register
class Label(Op):
  """The dataset's ClassLabel `label` -> label int32 [B]."""
  name = 'label'
  feature_types = {'label': 'ClassLabel'}

  def spec(self, batch_size):
    return {'label': ((batch_size,), np.int32)}

  def standardize(self, ex):
    return {'label': tf.cast(ex['label'], tf.int32)}


ATTRIBUTES = ('colour', 'shape', 'size')
MAX_OBJECTS = 2     # objects per example whose attributes an evaluation batch carries


@register
class Objects(Op):
  """Attributes of the first MAX_OBJECTS objects (a Sequence of dicts with ClassLabels
  colour / shape / size, whichever the dataset has) -> object_<attribute> int32 [B, 2], -1 where
  there is no such object. Evaluation only: the captioning scores read them."""
  name = 'objects'
  feature_types = {'objects': 'Sequence'}

  def attributes(self) -> list[str]:
    objects = self.source.features['objects']
    if not (isinstance(objects, tfds.features.Sequence)
            and isinstance(objects.feature, tfds.features.FeaturesDict)):
      return []
    fields = objects.feature
    return [a for a in ATTRIBUTES
            if a in fields.keys() and isinstance(fields[a], tfds.features.ClassLabel)]

  def names(self) -> dict[str, list[str]]:
    """attribute -> its class names."""
    fields = self.source.features['objects'].feature
    return {a: list(fields[a].names) for a in self.attributes()}

  def keys(self):
    return tuple(f'object_{a}' for a in self.attributes())

  def spec(self, batch_size):
    raise ValueError("input 'objects' is for evaluation only (the captioning scores read it); "
                     'take it out of config.data.inputs.')

  def standardize(self, ex):
    out = {}
    for a in self.attributes():
      first = tf.cast(ex['objects'][a][:MAX_OBJECTS], tf.int32)
      first = tf.pad(first, [[0, MAX_OBJECTS - tf.shape(first)[0]]], constant_values=-1)
      out[f'object_{a}'] = tf.ensure_shape(first, [MAX_OBJECTS])
    return out
