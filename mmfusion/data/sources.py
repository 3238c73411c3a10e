"""Where datasets come from: TFDS builders found in (or rendered into) the data dir, never
downloaded; reading a split's examples; filters and counts over scalar features.

`Source(config)` is one run's dataset, resolved once: its builder and what is derived from its
train split (the tokenizer, the answer vocabulary), each computed once and cached on disk.
A builder class with `RENDERED_LOCALLY = True` (the embedded `mmfusion_shapes`, or your own
that renders its data) is prepared into the data dir at first use; any other must have been
prepared there already (by TFDS, on a machine with network). A builder class may also offer
`config_from_spec(spec)` to turn `config.data.builder_config` strings with overrides into
builder configs (see data/shapes.py). `config.data.name = 'files:PATH'` is your own images and
captions (a manifest or a folder), built into the data dir at first use by data/files.py.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import time
from typing import Any, Iterable, Iterator, Mapping

from mmfusion.data.tf_lazy import tf, tfds

# This module reads datasets: TensorFlow now (kept off the accelerators), before shapes.py
# imports TFDS.
tf.load()
from mmfusion.data import shapes  # noqa: E402,F401  (registers the embedded dataset with TFDS)

_DEFAULT_DATA_DIR = os.path.join('~', '.cache', 'mmfusion', 'datasets')


def resolve_data_dir(data_config: Any) -> str:
  """config.data.data_dir, else $MMFUSION_DATA_DIR, else ~/.cache/mmfusion/datasets."""
  data_dir = data_config.data_dir or os.environ.get('MMFUSION_DATA_DIR') or _DEFAULT_DATA_DIR
  return os.path.expanduser(data_dir)


class Source:
  """The dataset of `config.data`, with its builder resolved (and rendered if local) once, when
  first needed: a run whose tokenizer is a file (imported weights) embeds plain inputs without
  touching its dataset."""

  def __init__(self, config: Any):
    self.config = config
    self.data_dir = resolve_data_dir(config.data)

  @functools.cached_property
  def builder(self):
    return get_builder(self.config.data)

  @property
  def features(self) -> tfds.features.FeaturesDict:
    return self.builder.info.features

  @property
  def where(self) -> str:
    return where(self.builder)

  @property
  def base_train_split(self) -> str:
    """'train[:90%]' -> 'train': vocabularies are built on, and named after, whole splits."""
    return re.split(r'[\[+]', self.config.data.train_split, maxsplit=1)[0].strip()

  def cache_path(self, suffix: str) -> str:
    """<data_dir>/tokenizers/<dataset>_<config>_<version>_<suffix>: what is derived from the
    dataset's train split and reused by every run on it."""
    builder = self.builder
    name = builder.builder_config.name if builder.builder_config else 'default'
    return os.path.join(self.data_dir, 'tokenizers',
                        f'{builder.name}_{name}_{builder.version}_{suffix}')

  @functools.cached_property
  def tokenizer(self):
    from mmfusion.data import text   # the vocabulary of every token-id input
    return text.get_tokenizer(self)

  def op(self, name: str, check: bool = True):
    """The input op `name` (data/ops.py) on this dataset, built once and checked against the
    dataset's features once (`check` off: for plain inputs, which need no dataset)."""
    ops = self.__dict__.setdefault('_ops', {})
    checked = self.__dict__.setdefault('_checked_ops', set())
    if name not in ops:
      from mmfusion.data import ops as ops_lib
      ops[name] = ops_lib.build(self, [name], check=False)[name]
    if check and name not in checked:
      ops[name].check()
      checked.add(name)
    return ops[name]

  @functools.cached_property
  def answers(self) -> list[str]:
    from mmfusion.data import text
    return text.answer_vocab(self)

  def has_labels(self) -> bool:
    """Whether the dataset has a ClassLabel `label` (what zero-shot and classification score)."""
    return 'label' in self.features and isinstance(self.features['label'],
                                                   tfds.features.ClassLabel)

  def class_names(self) -> list[str]:
    """Names of the dataset's `label` classes (the zero-shot prompts' words)."""
    if not self.has_labels():
      raise ValueError(f'Dataset {self.where} has no ClassLabel feature "label"; its features: '
                       f'{sorted(self.features.keys())}')
    return list(self.features['label'].names)

  def num_examples(self, split: Any) -> int:
    return self.builder.info.splits[split].num_examples

  def read(self, split: Any, keys: Iterable[str]) -> tf.data.Dataset:
    """Examples of `split` in file order, as dicts of `keys`, images left encoded."""
    keys = sorted(set(keys))
    decoders = {k: tfds.decode.SkipDecoding() for k in keys
                if isinstance(self.features[k], tfds.features.Image)}
    # Not tfds.decode.PartialDecoding: it logs a deprecation warning on every call.
    ds = self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=tfds.ReadConfig(try_autocache=False))
    return ds.map(lambda ex: {k: ex[k] for k in keys})

  def keep_if(self, keep_if: Mapping[str, Any]):
    """{'num_objects': 1} -> a tf predicate on examples; checks that the features exist."""
    features = self.features
    scalars = sorted(k for k in features.keys() if features[k].shape == ())
    wanted = {}
    for key, value in keep_if.items():
      if key not in scalars:
        raise ValueError(f'keep_if: {key!r} is not a scalar feature of {self.builder.name}; '
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

  def count(self, split: Any, keep_if: Mapping[str, Any] | None = None) -> int:
    """Examples of `split` that pass keep_if."""
    if not keep_if:
      return self.num_examples(split)
    ds = self.read(split, keep_if.keys()).filter(self.keep_if(keep_if))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def where(builder: tfds.core.DatasetBuilder) -> str:
  return f'{builder.name}/{builder.builder_config.name if builder.builder_config else ""}'


# ---------------------------------------------------------------------------- builders


def get_builder(data_config: Any) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder named by config.data; never downloads (see the module doc)."""
  if data_config.name.startswith('files:'):
    from mmfusion.data import files   # noqa: PLC0415  (it imports this module)
    return files.get_builder(data_config)
  data_dir = resolve_data_dir(data_config)
  try:
    builder_cls = tfds.builder_cls(data_config.name)
  except tfds.core.registered.DatasetNotFoundError:
    builder_cls = None
  if builder_cls is not None and getattr(builder_cls, 'RENDERED_LOCALLY', False):
    return _rendered_builder(builder_cls, data_config.builder_config, data_dir)
  return _prepared_builder(data_config.name, data_config.builder_config, data_dir)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # builder.is_prepared() logs a warning for every dataset that is not there yet. TFDS
  # renames a finished dataset into place, so its info file means it is complete.
  return tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json'))


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Silences TFDS's progress bars and stdout banners (we print one line instead)."""
  bars_were_on = getattr(tfds.core.utils.tqdm_utils, '_active', True)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(bars_were_on)


def _rendered_builder(builder_cls, spec: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """A locally rendered dataset, prepared into data_dir the first time."""
  name = builder_cls.name
  if hasattr(builder_cls, 'config_from_spec'):
    config = builder_cls.config_from_spec(spec or 'default')
    # Registered configs by name: TFDS only accepts its own object for a registered name.
    arg = config.name if config in builder_cls.BUILDER_CONFIGS else config
  else:
    arg = spec or None
    if arg and builder_cls.BUILDER_CONFIGS and arg not in builder_cls.builder_configs:
      raise ValueError(f'Dataset {name!r} has no builder_config {arg!r}; available: '
                       f'{sorted(builder_cls.builder_configs)}')
  builder = tfds.builder(name, config=arg, data_dir=data_dir)
  if is_prepared(builder):
    return builder
  start = time.time()
  try:
    with quiet_tfds():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception:
    # Processes sharing a file system race to prepare it; losing the race is fine.
    if not is_prepared(builder):
      raise
  builder = tfds.builder(name, config=arg, data_dir=data_dir)
  num = sum(split.num_examples for split in builder.info.splits.values())
  variant = builder.builder_config.name if builder.builder_config else 'default'
  print(f'Rendered {name}/{variant} ({num} examples) into {builder.data_dir} '
        f'in {time.time() - start:.1f} s', flush=True)
  return builder


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
  config_arg = f', config={builder_config!r}' if builder_config else ''
  how = (f'Prepare it on a machine with network (`tfds.builder({name!r}{config_arg}, '
         f'data_dir={data_dir!r}).download_and_prepare()`) and point config.data.data_dir (or '
         '$MMFUSION_DATA_DIR) at that directory; your own images and captions need no builder: '
         "config.data.name = 'files:PATH' (README, \"Your own data\").")
  available = _available_configs(name, data_dir)
  if builder_config and available is not None and builder_config.split(':')[0] not in available:
    raise ValueError(f'Dataset {name!r} has no builder_config {builder_config!r}; '
                     f'available: {available}')
  try:
    builder = tfds.builder(name, config=builder_config or None, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(f'Dataset {name!r} is neither registered nor prepared under '
                            f'{data_dir}. {how}') from None
  if not is_prepared(builder):
    variant = builder.builder_config.name if builder.builder_config else 'no config'
    raise FileNotFoundError(f'Dataset {name!r} ({variant}, version {builder.version}) is '
                            f'not prepared under {data_dir}. {how}')
  return builder
