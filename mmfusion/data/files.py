"""Your own images, captions (and labels, audio) as a dataset, with no builder to write:
`config.data.name = 'files:PATH'`, PATH a JSONL or CSV manifest or a folder.

It owns building the rows that data/manifests.py reads (with one clear error per malformed
input) once into a TFDS dataset in the data dir, under a name that carries a fingerprint of what
the build reads: checking and decoding the files, holding out a validation split, counting and
reporting what is skipped. `python -m mmfusion.data.files PATH` builds ahead of time and prints
the report. This docstring is the user's reference for the formats and rules.

Manifests (image and audio paths relative to the manifest's folder, or absolute):
  JSONL, one object per line:
      {"image": "pics/0001.png", "caption": "a red bicycle", "label": "bicycle"}
    "captions": ["...", "..."] gives several captions; "file_name" may name the image and "text"
    the caption (Hugging Face's metadata.jsonl); optional "label", "split" and "audio" (a WAV).
  CSV (or .tsv: tab-separated), with a header: an `image` (or `file_name`) column, a `caption`
    (or `captions`, `text`) column whose several captions are separated by '|', optional
    `label`, `split`, `audio` columns.
  Rows naming the same image are one example holding all their captions.
Folder: PATH/<split>/<label>/<image>, <split> one of train, validation (or val), test; or
  PATH/<label>/<image>, all train; label folders are optional (PATH/<split>/<image>,
  PATH/<image>). Images are .png, .jpg, .jpeg, .gif, .bmp, .webp. An image's captions are the
  lines of its sidecar text file (`cat1.png.txt`, else `cat1.txt`), else made from its label:
  'a photo of a {label}.', underscores read as spaces (also in the label names). A same-stem
  .wav file is its audio.

The dataset's features are those the input ops read: `image` (the longer side shrunk to at most
config.data.files.max_image_side, the aspect ratio kept: op 'image' resizes it to
config.data.image_size), `captions` (K texts, K the most any image has; an image with fewer
repeats its own in turn), `label` (ClassLabel over the sorted label names) when the data has
labels, `speech` (int16 at config.data.audio_sample_rate, what op 'audio' reads; 8/16/24/32-bit
PCM WAV, channels averaged) when the rows have audio.

Splits: those the data names. Without a validation split, config.data.files.validation_fraction
of train is held out as 'validation', chosen by a hash of each image's path as written (the same
images whatever the row order; at least one). A 'test' split exists only when the data has one,
so configs/own_clip.py evaluates on 'validation'.

Counted, listed in <data_dir>/own_files/<build name>/build_report.txt (its path printed) and
skipped: missing or unreadable images and clips (more than config.data.files.max_bad_fraction of
the images stops the build with one error), empty captions, images left with no caption.
Captions longer than config.data.files.max_caption_chars are cut, and counted.

The build is named `<manifest or folder name>-<fingerprint>`, a hash of the manifest's bytes (a
folder's file list), the size and modification time of every file it names, and the build
options: any change builds anew under another name, and what is cached per dataset (the
tokenizer: Source.cache_path) follows. Earlier builds stay in the data dir until deleted.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import wave
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from mmfusion.data import manifests
from mmfusion.data import sources
from mmfusion.data import spoken

PREFIX = 'files:'
REPORT_NAME = 'build_report.txt'

# The first bytes of the formats tf.io.decode_image reads: a cheap check, before anything is
# decoded, that lets the held-out split and the bad-file limit see missing and foreign files.
_IMAGE_SIGNATURES = (b'\x89PNG\r\n\x1a\n', b'\xff\xd8\xff', b'GIF87a', b'GIF89a', b'BM')


# ------------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Options:
  """How rows become a dataset: config.data.files, and the audio rate of config.data."""
  max_image_side: int
  max_caption_chars: int
  validation_fraction: float
  max_bad_fraction: float
  audio_sample_rate: int

  @classmethod
  def from_config(cls, data_config: Any) -> Options:
    files = data_config.files
    checks = {
        'max_image_side': files.max_image_side >= 8,
        'max_caption_chars': files.max_caption_chars >= 1,
        'validation_fraction': 0 <= files.validation_fraction < 1,
        'max_bad_fraction': 0 <= files.max_bad_fraction <= 1,
    }
    for key, ok in checks.items():
      if not ok:
        raise ValueError(f'config.data.files.{key} = {files[key]!r} is out of range (see '
                         'config.py: max_image_side >= 8, max_caption_chars >= 1, '
                         'validation_fraction in [0, 1), max_bad_fraction in [0, 1]).')
    return cls(int(files.max_image_side), int(files.max_caption_chars),
               float(files.validation_fraction), float(files.max_bad_fraction),
               int(data_config.audio_sample_rate))

  def fingerprinted(self, has_audio: bool) -> dict[str, Any]:
    """The options that decide what the build holds (max_bad_fraction only decides whether
    it goes ahead; the audio rate matters only with audio)."""
    out = dataclasses.asdict(self)
    del out['max_bad_fraction']
    if not has_audio:
      del out['audio_sample_rate']
    return out


# ------------------------------------------------------------------------ naming the build


def source_path(name: str) -> str:
  """'files:PATH' -> PATH, absolute; an empty PATH says what to write."""
  path = name[len(PREFIX):].strip()
  if not path:
    raise ValueError(f"config.data.name = {name!r} names no data: write 'files:PATH', PATH a "
                     'JSONL or CSV manifest or a folder of images (with configs/own_clip.py: '
                     '--config configs/own_clip.py:data=PATH).')
  return os.path.abspath(os.path.expanduser(path))


def absolute_name(name: str) -> str:
  """'files:rel/x.jsonl' -> 'files:/abs/rel/x.jsonl', so that a saved config finds its data
  from any working directory."""
  return PREFIX + source_path(name)


def _stat(path: str | None) -> str:
  if path is None:
    return '-'
  try:
    stat = os.stat(path)
  except OSError:
    return 'missing'
  return f'{stat.st_size}:{stat.st_mtime_ns}'


def fingerprint(table: manifests.Table, options: Options) -> str:
  """What a build reads, hashed: the manifest (or the folder's file list), the size and
  modification time of every file its rows name, the options that shape the build, the
  builder's version."""
  digest = hashlib.sha256(f'{OwnFiles.VERSION}\n{table.source}\n{table.content_digest}\n'.encode())
  for row in table.rows:
    digest.update(f'{row.image} {_stat(row.image)} {row.audio} {_stat(row.audio)}\n'.encode())
  digest.update(json.dumps(options.fingerprinted(table.has_audio), sort_keys=True).encode())
  return digest.hexdigest()[:10]


def build_name(table: manifests.Table, options: Options) -> str:
  """`<manifest or folder name>-<fingerprint>`, as a TFDS config name."""
  stem = os.path.splitext(os.path.basename(table.source.rstrip(os.sep)))[0]
  stem = re.sub(r'[^a-z0-9_]+', '_', stem.lower()).strip('_') or 'data'
  return f'{stem}-{fingerprint(table, options)}'


# ----------------------------------------------------------------------------- the splits


def unit_hash(key: str) -> float:
  """A path -> a number in [0, 1), the same on every machine."""
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big') / 2**64


def held_out(keys: list[str], fraction: float) -> set[str]:
  """The keys whose hash falls under `fraction`; at least one, never all."""
  if len(keys) < 2:
    raise ValueError(f'the data has no validation split and {len(keys)} readable training '
                     'image(s), too few to hold one out: give it a validation split or more '
                     'images, or set config.data.files.validation_fraction=0.')
  ranked = sorted(keys, key=unit_hash)
  chosen = [k for k in ranked if unit_hash(k) < fraction] or ranked[:1]
  return set(chosen[:len(keys) - 1])


def assign_splits(rows: list[manifests.Row], fraction: float) -> dict[str, list[manifests.Row]]:
  """The rows of each split the data has, with 'validation' held out of train when it has
  none (and fraction > 0)."""
  splits = {s: [r for r in rows if r.split == s] for s in manifests.SPLITS}
  if not splits['validation'] and splits['train'] and fraction > 0:
    chosen = held_out([r.key for r in splits['train']], fraction)
    splits['validation'] = [r for r in splits['train'] if r.key in chosen]
    splits['train'] = [r for r in splits['train'] if r.key not in chosen]
  return {s: r for s, r in splits.items() if r}


# ---------------------------------------------------------------------------- the files


def _first_bytes(path: str) -> tuple[bytes, str | None]:
  """The file's first 12 bytes, or why they cannot be read."""
  try:
    with open(path, 'rb') as f:
      return f.read(12), None
  except FileNotFoundError:
    return b'', 'missing'
  except OSError as e:
    return b'', f'cannot be read ({e.strerror})'


def sniff_image(path: str) -> str | None:
  """Why the file cannot be an image, or None: missing, unreadable, or not a format
  tf.io.decode_image reads (only its first bytes are read)."""
  head, problem = _first_bytes(path)
  if problem:
    return problem
  if not head:
    return 'empty file'
  if head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b'RIFF' and head[8:12] == b'WEBP'):
    return None
  return 'not a PNG, JPEG, GIF, BMP or WebP image'


def sniff_wav(path: str) -> str | None:
  """Why the file cannot be a WAV clip, or None (only its first bytes are read)."""
  head, problem = _first_bytes(path)
  if problem:
    return problem
  if head[:4] != b'RIFF' or head[8:12] != b'WAVE':
    return 'not a WAV file'
  return None


def encoded_image(path: str, max_side: int) -> bytes:
  """An image file -> PNG or JPEG bytes of its RGB pixels, the longer side at most `max_side`
  (aspect kept). A PNG or JPEG small enough is kept as it is; a JPEG stays a JPEG (quality 95),
  anything else becomes a PNG. Raises tf.errors.OpError when it does not decode."""
  with open(path, 'rb') as f:
    data = f.read()
  image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
  height, width = int(image.shape[0]), int(image.shape[1])
  is_jpeg = data.startswith(b'\xff\xd8\xff')
  if max(height, width) <= max_side and (is_jpeg or data.startswith(_IMAGE_SIGNATURES[0])):
    return data
  if max(height, width) > max_side:
    scale = max_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = tf.image.resize(image, size, method='bilinear', antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  encoded = tf.io.encode_jpeg(image, quality=95) if is_jpeg else tf.io.encode_png(image)
  return encoded.numpy()


def _pcm_to_float(data: bytes, width: int) -> np.ndarray:
  """Little-endian PCM samples of `width` bytes -> float64 in [-1, 1)."""
  if width == 1:                                   # 8-bit WAV is unsigned
    return (np.frombuffer(data, np.uint8).astype(np.float64) - 128) / 128
  if width == 3:                                   # 24-bit: sign-extend into int32
    raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
    values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
    return np.where(values >= 2**23, values - 2**24, values) / 2.0**23
  if width in (2, 4):
    return np.frombuffer(data, f'<i{width}').astype(np.float64) / 2.0**(8 * width - 1)
  raise ValueError(f'{8 * width}-bit samples are not supported')


def read_wav(path: str, sample_rate: int) -> np.ndarray:
  """A PCM WAV file -> int16 [samples] at `sample_rate`, its channels averaged. Raises
  wave.Error, EOFError or ValueError when it cannot."""
  with wave.open(path, 'rb') as f:
    channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
    data = f.readframes(f.getnframes())
  frame = channels * width
  samples = _pcm_to_float(data[:len(data) // frame * frame], width)
  samples = samples.reshape(-1, channels).mean(axis=1)
  if not samples.size:
    raise ValueError('no samples')
  if rate != sample_rate:
    from scipy import signal   # noqa: PLC0415  (a dependency of jax; only needed here)
    common = math.gcd(rate, sample_rate)
    samples = signal.resample_poly(samples, sample_rate // common, rate // common)
  return np.clip(np.round(samples * 32768), -32768, 32767).astype(np.int16)


def _first_line(error: Exception) -> str:
  """An exception's message, short: its first line without TensorFlow's op decorations."""
  message = getattr(error, 'message', None) or str(error)
  message = re.sub(r'\{\{.*?\}\}|\[Op:\w+\]', '', message).strip()
  return message.splitlines()[0] if message else type(error).__name__


# ---------------------------------------------------------------------------- the builder


@dataclasses.dataclass(eq=False, repr=False)
class FilesConfig(tfds.core.BuilderConfig):
  """One build: the rows it reads and how."""
  table: manifests.Table | None = None
  options: Options | None = None

  def __repr__(self) -> str:
    return f'FilesConfig({self.name!r}, from {self.description})'


class OwnFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The rows of a manifest or folder (FilesConfig) as a TFDS dataset; see the module doc.

  While it prepares, `unreadable` collects (origin, path, reason) of every file skipped (for
  `report_path`), `held_out` says whether validation came out of train, `bar` counts images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, **kwargs: Any):
    super().__init__(**kwargs)
    # Beside the version folder of the build, so that a failed build has one too. (Taken now:
    # while TFDS prepares, data_dir points at a temporary folder.)
    self.report_path = os.path.join(os.path.dirname(self.data_dir), REPORT_NAME)
    self.unreadable: list[tuple[str, str, str]] = []
    self.held_out = False
    self.bar: tqdm.tqdm | None = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # As in data/shapes.py: TFDS 4.9's default needs the importlib_resources backport.
    return epath.Path(__file__)

  def _create_builder_config(self, builder_config, version):
    # Every build is a config of its own (named by its fingerprint), not one of a fixed list;
    # TFDS would log a warning for each.
    del version
    return builder_config

  @property
  def table(self) -> manifests.Table:
    return self.builder_config.table

  @property
  def options(self) -> Options:
    return self.builder_config.options

  def _info(self) -> tfds.core.DatasetInfo:
    table = self.table
    features = {
        # encoding_format None: the bytes are stored as they come (PNG or JPEG).
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format=None),
        'captions': tfds.features.Sequence(tfds.features.Text(), length=table.num_captions),
    }
    if table.label_names:
      features['label'] = tfds.features.ClassLabel(names=table.label_names)
    if table.has_audio:
      features['speech'] = spoken.PcmAudio(self.options.audio_sample_rate)
    return self.dataset_info_from_configs(
        description=f'Built from {table.source} (mmfusion/data/files.py).',
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager    # the files are local
    readable = [row for row in self.table.rows if self._looks_readable(row)]
    self._check_bad_share()
    splits = assign_splits(readable, self.options.validation_fraction)
    named = any(r.split == 'validation' for r in readable)
    self.held_out = 'validation' in splits and not named
    self.bar = tqdm.tqdm(total=len(readable), desc=f'building {sources.where(self)}',
                         unit='image', dynamic_ncols=True)
    return {split: self._generate_examples(split, rows) for split, rows in splits.items()}

  def _looks_readable(self, row: manifests.Row) -> bool:
    for path, sniff in ((row.image, sniff_image), (row.audio, sniff_wav)):
      reason = path and sniff(path)
      if reason:
        self.unreadable.append((row.origin, path, reason))
        return False
    return True

  def _check_bad_share(self) -> None:
    """Stops the build when too many images are unreadable (the report lists them)."""
    total = len(self.table.rows)
    share = len(self.unreadable) / total
    if share > self.options.max_bad_fraction:
      raise ValueError(
          f'{self.table.source}: {len(self.unreadable)} of {total} images ({share:.0%}) have a '
          f'missing or unreadable file (image or audio), more than config.data.files.'
          f'max_bad_fraction = {self.options.max_bad_fraction:.0%} allows; they are listed in '
          f'{self.report_path}. Fix or remove them, or raise the limit.')

  def _generate_examples(self, split: str, rows: list[manifests.Row]) -> Iterator[tuple[str, dict]]:
    num_captions, written = self.table.num_captions, 0
    for row in rows:
      example = self._example(row, num_captions)
      self.bar.update(1)
      if example is None:
        continue
      if 'speech' in example:
        self._record_clip_length(split, len(example['speech']))
      written += 1
      yield row.key, example
    self._check_bad_share()
    if not written:
      raise ValueError(f'{self.table.source}: none of the {len(rows)} images of split '
                       f'{split!r} could be read; they are listed in {self.report_path}.')

  def _record_clip_length(self, split: str, num_samples: int) -> None:
    """The longest clip of each split, in the metadata: op 'audio' refuses a too-short
    config.data.audio_max_seconds from it before reading anything (as for data/spoken.py)."""
    longest = self.info.metadata.setdefault('longest_clip_seconds', {}).setdefault(split, {})
    seconds = num_samples / self.options.audio_sample_rate
    longest['speech'] = max(longest.get('speech', 0.0), seconds)

  def _example(self, row: manifests.Row, num_captions: int) -> dict[str, Any] | None:
    """The row's features, or None (and the file counted) when a file does not decode."""
    try:
      image = encoded_image(row.image, self.options.max_image_side)
    except (tf.errors.OpError, OSError) as e:
      self.unreadable.append((row.origin, row.image, f'does not decode: {_first_line(e)}'))
      return None
    example = {'image': image,
               'captions': [row.captions[i % len(row.captions)] for i in range(num_captions)]}
    if row.label is not None:
      example['label'] = row.label
    if row.audio is not None:
      try:
        example['speech'] = read_wav(row.audio, self.options.audio_sample_rate)
      except (wave.Error, EOFError, OSError, ValueError) as e:
        self.unreadable.append((row.origin, row.audio, f'does not decode: {_first_line(e)}'))
        return None
    return example


# ------------------------------------------------------------------------- build and report


def get_builder(data_config: Any) -> tfds.core.DatasetBuilder:
  """The dataset of config.data.name = 'files:PATH', built into the data dir the first time
  (and after any change to what it reads); see the module doc."""
  if data_config.builder_config:
    raise ValueError(f'config.data.builder_config = {data_config.builder_config!r}: a '
                     "'files:' dataset has none; its build options are config.data.files.")
  path = source_path(data_config.name)
  options = Options.from_config(data_config)
  table = manifests.read_table(path, options.max_caption_chars)
  config = FilesConfig(name=build_name(table, options), description=path, table=table,
                       options=options)
  data_dir = sources.resolve_data_dir(data_config)
  builder = OwnFiles(config=config, data_dir=data_dir)
  if sources.is_prepared(builder):
    print(f'{sources.where(builder)}: {_split_counts(builder)}, built earlier from {path} '
          f'into {builder.data_dir}; report: {builder.report_path}', flush=True)
    return builder
  return _build(builder, data_dir)


def _build(builder: OwnFiles, data_dir: str) -> OwnFiles:
  start = time.time()
  try:
    with sources.quiet_tfds():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception:
    if not sources.is_prepared(builder):
      _write_report(builder)     # what it found so far: the error names the report
      raise
    # Processes sharing a file system race to build it; losing the race is fine.
    return OwnFiles(config=builder.builder_config, data_dir=data_dir)
  finally:
    if builder.bar is not None:
      builder.bar.close()
  _write_report(builder)
  built = OwnFiles(config=builder.builder_config, data_dir=data_dir)
  print(summary(builder, built, time.time() - start), flush=True)
  return built


def _split_counts(builder: tfds.core.DatasetBuilder) -> str:
  splits = builder.info.splits
  return ', '.join(f'{s} {splits[s].num_examples}' for s in manifests.SPLITS if s in splits)


def summary(builder: OwnFiles, built: tfds.core.DatasetBuilder, seconds: float) -> str:
  """The one line printed after a build: examples per split, then what was skipped or cut."""
  table = builder.table
  held = ' (held out from train)' if builder.held_out else ''
  return (f'Built {sources.where(built)} from {table.source} in {seconds:.1f} s: '
          f'{_split_counts(built)}{held}; skipped {len(builder.unreadable)} missing or '
          f'unreadable files, {len(table.empty_captions)} empty captions, '
          f'{len(table.uncaptioned)} images without a caption; truncated '
          f'{len(table.truncated)} captions to {builder.options.max_caption_chars} characters. '
          f'Report: {builder.report_path}')


def _write_report(builder: OwnFiles) -> None:
  table, options = builder.table, builder.options
  checked = len(table.rows)
  row_order = {row.origin: i for i, row in enumerate(table.rows)}
  unreadable = sorted(builder.unreadable, key=lambda u: row_order[u[0]])   # as the data lists them
  lines = [
      'mmfusion: build report of a files: dataset (mmfusion/data/files.py)',
      f'source: {table.source}',
      f'dataset: {sources.where(builder)}, version {builder.version}, under '
      f'{os.path.dirname(builder.report_path)}',
      f'options: {json.dumps(dataclasses.asdict(options), sort_keys=True)}',
      '',
      f'missing or unreadable files, skipped: {len(builder.unreadable)} of {checked} images '
      f'({len(builder.unreadable) / checked:.1%}; the limit is {options.max_bad_fraction:.0%})',
      *[f'  {origin}: {path}: {reason}' for origin, path, reason in unreadable],
      f'empty captions, skipped: {len(table.empty_captions)}',
      *[f'  {origin}' for origin in table.empty_captions],
      f'images without a caption, skipped: {len(table.uncaptioned)}',
      *[f'  {origin}' for origin in table.uncaptioned],
      f'captions truncated to {options.max_caption_chars} characters: {len(table.truncated)}',
      *[f'  {origin}' for origin in table.truncated],
  ]
  if table.ignored:
    lines += [f'files ignored (neither images nor their .txt / .wav): {len(table.ignored)}',
              *[f'  {path}' for path in table.ignored]]
  os.makedirs(os.path.dirname(builder.report_path), exist_ok=True)
  with open(builder.report_path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


# ----------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
  """`python -m mmfusion.data.files PATH [--data_dir D]`: builds ahead of time with the default
  build options (config.data.files of config.py, which configs/own_clip.py keeps), so that the
  training run finds it built; prints the report."""
  from mmfusion import config as config_lib   # noqa: PLC0415
  parser = argparse.ArgumentParser(prog='python -m mmfusion.data.files', description=main.__doc__)
  parser.add_argument('path', help='a JSONL or CSV manifest, or a folder of images')
  parser.add_argument('--data_dir', default='', help='default: $MMFUSION_DATA_DIR or '
                      '~/.cache/mmfusion/datasets')
  args = parser.parse_args(argv)
  data_config = config_lib.base().data
  data_config.name, data_config.data_dir = PREFIX + args.path, args.data_dir
  try:
    builder = get_builder(data_config)
  except (ValueError, OSError) as e:
    sys.exit(f'mmfusion: {e}')
  with open(builder.report_path, encoding='utf-8') as f:
    print(f.read(), end='')


if __name__ == '__main__':
  # The builder class must live in mmfusion.data.files, not __main__: TFDS finds a builder's
  # package from its module.
  from mmfusion.data import files as _files
  _files.main()
