"""The embedded dataset `mmfusion_shapes`: coloured shapes with captions, rendered locally.

It owns the renderer (`render_example`, pure numpy) and the TFDS builder around it; it is
also the template for adding your own TFDS dataset to mmfusion (see below). Its configs
`spoken` and `spoken_tiny` add speech: a caption and a question of each scene, spoken
(data/spoken.py).

Adding your own dataset
-----------------------
Write a `tfds.core.GeneratorBasedBuilder` like `MmfusionShapes` below:
  * `_info()` declares the features. The input ops (`mmfusion/data/ops.py`, by name in
    `config.data.inputs`) read them: op `image` reads `image` (`tfds.features.Image`, any
    size, 1 or 3 channels), op `text` reads `captions`
    (`tfds.features.Sequence(tfds.features.Text(), length=K)` with a fixed K, or a
    single `tfds.features.Text()`), op `label` reads `label` (`tfds.features.ClassLabel`,
    whose names become zero-shot class prompts), op `question` reads `questions` and
    `answers`. Scalar features such as `num_objects` can be used to filter evaluation sets
    (`keep_if`). Other features are ignored. A feature of a modality of your own comes with
    an op of your own (`ops.register`).
  * `_split_generators(dl_manager)` returns `{split_name: self._generate_examples(...)}`;
    download with `dl_manager` there if you must, on a machine with network: training
    never downloads, it only reads what TFDS prepared under `config.data.data_dir`.
  * `_generate_examples(...)` yields `(unique_key, example_dict)`.
  * Import the module before `tfds.builder(name)` is called so that TFDS registers it,
    and set `config.data.name` to its snake_case name. With `RENDERED_LOCALLY = True` (as
    here) mmfusion prepares it into the data dir at first use.

Each example is rendered from `np.random.default_rng([seed, split_id, index])`, so the
data do not depend on generation order, and the same seed gives identical tfrecord bytes.
(One file of ~430 lines on purpose: as the template for your own dataset, the renderer and the
builder read together.)
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import struct
from typing import Any
import zlib

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mmfusion.data import spoken

NAME = 'mmfusion_shapes'

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
# Hues far apart, saturated enough to survive a 64 -> 32 px resize and the pipeline's
# colour jitter; RGB in [0, 255].
COLOURS = ('red', 'orange', 'yellow', 'green', 'blue', 'purple')
_RGB = {
    'red': (214, 36, 36),
    'orange': (245, 128, 20),
    'yellow': (240, 206, 20),
    'green': (36, 156, 56),
    'blue': (36, 76, 222),
    'purple': (142, 52, 190),
}
SIZES = ('small', 'large')
# Radius of an object as a fraction of the image side (times 0.95..1.05); at 32 px a small
# object spans ~7 px and a large one ~12 px. Two large objects must fit side by side.
_RADIUS = {'small': 0.115, 'large': 0.19}
# Half-extent of each shape's bounding box in units of its radius (see _signed_distance).
_EXTENT = {'circle': 1.0, 'square': 0.87, 'triangle': 1.04, 'diamond': 1.1, 'cross': 1.0}
CLASS_NAMES = tuple(f'{c} {s}' for c, s in itertools.product(COLOURS, SHAPES))

NUM_CAPTIONS = 5
NUM_QUESTIONS = 5
SPLITS = ('train', 'validation', 'test')

# Named regions on a 3x3 grid: (column, row) in {0, 1, 2}, and how a caption says it.
_REGIONS = {
    (0, 0): 'in the top left', (1, 0): 'at the top', (2, 0): 'in the top right',
    (0, 1): 'on the left', (1, 1): 'in the centre', (2, 1): 'on the right',
    (0, 2): 'in the bottom left', (1, 2): 'at the bottom', (2, 2): 'in the bottom right',
}
_CELL_CENTRE = (0.25, 0.5, 0.75)
_JITTER = 0.04          # position jitter around a region's centre
_MARGIN = 0.02          # gap kept to the image border
_GAP = 0.06             # gap kept between two objects' bounding boxes
# Relation of object 0 to object 1, and its inverse (object 1 to object 0).
_RELATIONS = {'left of': 'right of', 'right of': 'left of', 'above': 'below',
              'below': 'above'}
_SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
_NUMBER_WORDS = ('zero', 'one', 'two')


# ----------------------------------------------------------------------------- rendering


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Approximate signed distance (<0 inside) to `shape` of half-extent r at offset dx, dy.

  Exact near edges (what anti-aliasing needs); corners are rounded off a little.
  """
  ax, ay = np.abs(dx), np.abs(dy)
  if shape == 'circle':
    return np.sqrt(dx * dx + dy * dy) - r
  if shape == 'square':
    # A square of the circle's half-extent looks bigger than the circle: shrink it.
    return np.maximum(ax, ay) - 0.87 * r
  if shape == 'diamond':
    return (ax + ay - 1.1 * r) / np.sqrt(2.0)
  if shape == 'triangle':
    # Upward equilateral triangle, circumradius t, shifted so its bounding box is centred.
    t = 1.2 * r
    y = dy - 0.25 * t
    edges = np.maximum(-0.5 * y + 0.866 * dx, -0.5 * y - 0.866 * dx)
    return np.maximum(y, edges) - 0.5 * t
  if shape == 'cross':
    # Thick arms: a thin plus sign turns into a blob at 32 px.
    arm = 0.36 * r
    return np.minimum(np.maximum(ax - r, ay - arm), np.maximum(ax - arm, ay - r))
  raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}')


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A light, slightly tinted and gradient-shaded background, float32 [S, S, 3].

  No per-pixel noise: it would make PNGs 6x larger and 4x slower to write.
  """
  grey = rng.uniform(205, 240)
  tint = rng.uniform(-8, 8, size=3).astype(np.float32)
  ramp = np.linspace(-1, 1, size, dtype=np.float32)
  gx, gy = rng.uniform(-6, 6, size=2).astype(np.float32)
  shade = gx * ramp[None, :] + gy * ramp[:, None] + np.float32(grey)
  return shade[..., None] + tint


def _coverage(obj: dict[str, Any], size: int) -> tuple[slice, slice, np.ndarray]:
  """How much of each pixel one object covers, float32 in [0, 1] from its signed distance
  (analytic anti-aliasing), over its bounding box plus a pixel: (rows, cols, alpha [h, w])."""
  half = obj['extent'] * size + 1.5
  x0, x1 = max(int(obj['x'] * size - half), 0), min(int(obj['x'] * size + half) + 1, size)
  y0, y1 = max(int(obj['y'] * size - half), 0), min(int(obj['y'] * size + half) + 1, size)
  dx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) / size - obj['x']
  dy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) / size - obj['y']
  sdf_px = _signed_distance(obj['shape'], dx, dy, obj['radius']) * size
  return slice(y0, y1), slice(x0, x1), np.clip(0.5 - sdf_px, 0.0, 1.0)


def _paint(image: np.ndarray, obj: dict[str, Any], rgb: np.ndarray) -> None:
  """Alpha-blends one object into `image` in place; only its bounding box is touched."""
  rows, cols, alpha = _coverage(obj, image.shape[0])
  patch = image[rows, cols]
  patch += alpha[..., None] * (rgb - patch)


def object_masks(objects: list[dict[str, Any]], size: int) -> np.ndarray:
  """float32 [num_objects, S, S]: each object's pixel coverage (what the pointing game scores
  heat-maps against, mmfusion/pointing.py)."""
  masks = np.zeros((len(objects), size, size), np.float32)
  for mask, obj in zip(masks, objects):
    rows, cols, alpha = _coverage(obj, size)
    mask[rows, cols] = alpha
  return masks


# ------------------------------------------------------------------------------- layout


def _cell_position(rng: np.random.Generator, cell: int, extent: float) -> float:
  """A coordinate near the centre of grid cell `cell`, kept `extent` inside the image."""
  lo, hi = extent + _MARGIN, 1.0 - extent - _MARGIN
  return min(max(_CELL_CENTRE[cell] + rng.uniform(-_JITTER, _JITTER), lo), hi)


def _place_one(rng: np.random.Generator, obj: dict[str, Any]) -> None:
  col, row = int(rng.integers(3)), int(rng.integers(3))
  obj['x'] = _cell_position(rng, col, obj['extent'])
  obj['y'] = _cell_position(rng, row, obj['extent'])
  obj['region'] = _REGIONS[(col, row)]


def _place_pair(rng: np.random.Generator, a: dict[str, Any], b: dict[str, Any],
                relation: str) -> None:
  """Places a and b in one lane (row or column) so that `a <relation> b` holds with a gap
  between them; across the lane they differ by at most the jitter, so the relation is clear.
  """
  along_x = relation in ('left of', 'right of')
  near, far = (a, b) if relation in ('left of', 'above') else (b, a)
  span = near['extent'] + far['extent'] + _GAP    # least distance between the centres
  lo, hi = _MARGIN + near['extent'], 1.0 - _MARGIN - far['extent']
  if hi - lo < span:   # _RADIUS and _EXTENT are chosen so that two large diamonds fit
    raise ValueError(f'objects too large to place side by side: {near}, {far}')
  near_main = rng.uniform(lo, hi - span)
  far_main = rng.uniform(near_main + span, hi)
  lane = int(rng.integers(3))
  for obj, main in ((near, near_main), (far, far_main)):
    cross = _cell_position(rng, lane, obj['extent'])
    cell = min(int(main * 3), 2)
    obj['x'], obj['y'] = (main, cross) if along_x else (cross, main)
    obj['region'] = _REGIONS[(cell, lane) if along_x else (lane, cell)]


def _sample_objects(rng: np.random.Generator) -> tuple[list[dict[str, Any]], str | None]:
  """1 or 2 objects (distinct colour and shape); the primary one is the larger or equal."""
  num = int(rng.integers(1, 3))
  colour_ids = rng.choice(len(COLOURS), size=num, replace=False)
  shape_ids = rng.choice(len(SHAPES), size=num, replace=False)
  size_ids = np.sort(rng.integers(len(SIZES), size=num))[::-1]   # 'large' (1) first
  objects = []
  for c, s, z in zip(colour_ids, shape_ids, size_ids):
    size, shape = SIZES[z], SHAPES[s]
    radius = _RADIUS[size] * rng.uniform(0.95, 1.05)
    objects.append(dict(colour=COLOURS[c], shape=shape, size=size, radius=radius,
                        extent=radius * _EXTENT[shape]))
  if num == 1:
    _place_one(rng, objects[0])
    return objects, None
  relation = str(rng.choice(list(_RELATIONS)))
  _place_pair(rng, objects[0], objects[1], relation)
  return objects, relation


# ----------------------------------------------------------------------------- language


def _articles(text: str) -> str:
  """'a orange' -> 'an orange' (templates write 'a' everywhere)."""
  return re.sub(r'\ba (?=[aeiou])', 'an ', text)


def _captions_one(rng: np.random.Generator, o: dict[str, Any]) -> list[str]:
  sz = _SIZE_WORDS[o['size']][rng.integers(2)]
  c, s, loc = o['colour'], o['shape'], o['region']
  first = f'a {o["size"]} {c} {s} {loc}'
  pool = [
      f'a {c} {s}',
      f'there is a {sz} {c} {s}',
      f'a {c} {s} {loc}',
      f'a picture of a {c} {s}',
      f'a {sz} {c} {s} on a plain background',
      f'the {c} {s} is {loc}',
      f'one {sz} {c} {s}',
  ]
  return [first] + [pool[i] for i in rng.choice(len(pool), NUM_CAPTIONS - 1, replace=False)]


def _captions_two(rng: np.random.Generator, a: dict[str, Any], b: dict[str, Any],
                  rel: str) -> list[str]:
  sza = _SIZE_WORDS[a['size']][rng.integers(2)]
  szb = _SIZE_WORDS[b['size']][rng.integers(2)]
  ca, sa, cb, sb, inv = a['colour'], a['shape'], b['colour'], b['shape'], _RELATIONS[rel]
  first = f'a {a["size"]} {ca} {sa} {rel} a {b["size"]} {cb} {sb}'
  pool = [
      f'a {ca} {sa} {rel} a {cb} {sb}',
      f'a {cb} {sb} {inv} a {ca} {sa}',
      f'a {ca} {sa} and a {cb} {sb}',
      f'there is a {sza} {ca} {sa} {rel} a {szb} {cb} {sb}',
      f'a {ca} {sa} {a["region"]} and a {cb} {sb} {b["region"]}',
      f'two shapes a {ca} {sa} and a {cb} {sb}',
      f'a {cb} {sb} and a {sza} {ca} {sa}',
  ]
  return [first] + [pool[i] for i in rng.choice(len(pool), NUM_CAPTIONS - 1, replace=False)]


def _questions(rng: np.random.Generator, objects: list[dict[str, Any]],
               relation: str | None) -> tuple[list[str], list[str]]:
  """NUM_QUESTIONS (question, single-word answer) pairs about colour, shape, count,
  existence or spatial relation, and size. Objects differ in colour and in shape, so
  naming either one identifies an object."""
  pick = lambda: objects[rng.integers(len(objects))]  # noqa: E731
  qa = []
  o = pick()
  qa.append((f'what colour is the {o["shape"]}', o['colour']))
  o = pick()
  qa.append((f'what shape is the {o["colour"]} object', o['shape']))
  qa.append(('how many shapes are there', _NUMBER_WORDS[len(objects)]))
  if relation is None:
    o = objects[0]
    truth = bool(rng.integers(2))
    colour, shape = o['colour'], o['shape']
    if not truth:   # ask about a class that is not in the image
      while (colour, shape) == (o['colour'], o['shape']):
        colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    qa.append((f'is there a {colour} {shape}', 'yes' if truth else 'no'))
  else:
    a, b = objects if rng.integers(2) else objects[::-1]
    true_rel = relation if a is objects[0] else _RELATIONS[relation]
    truth = bool(rng.integers(2))
    asked = true_rel if truth else _RELATIONS[true_rel]
    qa.append((f'is the {a["shape"]} {asked} the {b["shape"]}', 'yes' if truth else 'no'))
  o = pick()
  qa.append((f'what size is the {o["colour"]} {o["shape"]}', o['size']))
  return [q for q, _ in qa], [a for _, a in qa]


def render_example(rng: np.random.Generator, image_size: int) -> dict[str, Any]:
  """Renders one example; a pure function of the generator's state.

  Returns a dict with `image` uint8 [S, S, 3], `label` (index into CLASS_NAMES of the
  primary object), `num_objects`, `objects` (list of dicts: shape, colour, size names,
  x, y centre in [0, 1], y downwards), `relation` (of object 0 to object 1, or None),
  `captions` (NUM_CAPTIONS strings), `questions` and `answers` (NUM_QUESTIONS each), and
  `masks` float32 [num_objects, S, S], each object's pixel coverage (not a dataset feature).
  """
  objects, relation = _sample_objects(rng)
  image = _background(rng, image_size)
  for obj in objects:
    rgb = np.asarray(_RGB[obj['colour']], np.float32) + rng.uniform(-10, 10, size=3)
    _paint(image, obj, rgb.astype(np.float32))
  if relation is None:
    captions = _captions_one(rng, objects[0])
  else:
    captions = _captions_two(rng, objects[0], objects[1], relation)
  questions, answers = _questions(rng, objects, relation)
  captions, questions = map(_articles, captions), map(_articles, questions)
  primary = objects[0]
  return dict(
      image=np.clip(np.round(image), 0, 255).astype(np.uint8),
      label=CLASS_NAMES.index(f'{primary["colour"]} {primary["shape"]}'),
      num_objects=len(objects),
      objects=[{k: o[k] for k in ('shape', 'colour', 'size', 'x', 'y')} for o in objects],
      relation=relation,
      captions=list(captions),
      questions=list(questions),
      answers=answers,
      masks=object_masks(objects, image_size),
  )


# --------------------------------------------------------------------------------- TFDS


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no filter, zlib level 6).

  Written here because TensorFlow's encoder (what tfds.features.Image calls) costs 4x
  as much per small image and dominated the time to render the dataset.
  """
  height, width, _ = image.shape

  def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)

  rows = np.concatenate([np.zeros((height, 1), np.uint8),   # filter type 0 per row
                         image.reshape(height, width * 3)], axis=1)
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)   # 8 bit, RGB
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
          + chunk(b'IDAT', zlib.compress(rows.tobytes(), 6)) + chunk(b'IEND', b''))


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """How many examples of which size, from which seed.

  Pass your own to `tfds.builder(NAME, config=ShapesConfig(name='mine', ...))`, or use
  `config_from_spec('default,seed=3,num_train=50000')` (what `config.data.builder_config`
  accepts).
  """
  image_size: int = 64
  num_train: int = 20_000
  num_validation: int = 2_000
  num_test: int = 2_000
  seed: int = 0
  spoken: int = 0          # 1: a caption and a question of each scene spoken (data/spoken.py)

  def num_examples(self, split: str) -> int:
    return {'train': self.num_train, 'validation': self.num_validation,
            'test': self.num_test}[split]


_BUILDER_CONFIGS = (
    ShapesConfig(name='default', description='64 px; 20000/2000/2000 examples.'),
    ShapesConfig(name='tiny', description='64 px; 256/64/64 examples, for tests.',
                 num_train=256, num_validation=64, num_test=64),
    ShapesConfig(name='spoken', description='64 px; 10000/1000/1000 examples, a caption and '
                 'a question of each spoken; speaker-disjoint splits.', num_train=10_000,
                 num_validation=1_000, num_test=1_000, spoken=1),
    ShapesConfig(name='spoken_tiny', description='spoken, 256/64/64 examples, for tests.',
                 num_train=256, num_validation=64, num_test=64, spoken=1),
)


def config_from_spec(spec: str) -> ShapesConfig:
  """'tiny' -> the registered config; 'tiny,seed=3,num_train=100' -> a copy with overrides
  (named 'tiny-seed3-num_train100', so each variant gets its own directory)."""
  base_name, *overrides = [part.strip() for part in spec.split(',')]
  known = {c.name: c for c in _BUILDER_CONFIGS}
  if base_name not in known:
    raise ValueError(f'{NAME}: unknown builder_config {base_name!r} (from {spec!r}); '
                     f'available: {sorted(known)}')
  if not overrides:
    return known[base_name]
  fields = {f.name for f in dataclasses.fields(ShapesConfig)} - {
      f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  values, suffix = {}, [base_name]
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep or key not in fields or not value.lstrip('-').isdigit():
      raise ValueError(f'{NAME}: bad builder_config override {item!r} in {spec!r}; '
                       f'expected key=integer with key in {sorted(fields)}')
    values[key] = int(value)
    suffix.append(f'{key}{int(value)}')
  return dataclasses.replace(known[base_name], name='-'.join(suffix), description=spec,
                             **values)


class MmfusionShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on a plain background, with captions, labels and QA pairs."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = list(_BUILDER_CONFIGS)
  RENDERED_LOCALLY = True          # mmfusion prepares it at first use (data/sources.py)
  config_from_spec = staticmethod(config_from_spec)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9's default needs the `importlib_resources` backport for builders defined in
    # a package, which Python >= 3.9 installs do not have; the answer is this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    spoken_features = spoken.features() if self.builder_config.spoken else {}
    return self.dataset_info_from_configs(
        description=__doc__.splitlines()[0],
        metadata=tfds.core.MetadataDict(),
        features=tfds.features.FeaturesDict({
            **spoken_features,
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'captions': tfds.features.Sequence(tfds.features.Text(),
                                               length=NUM_CAPTIONS),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'num_objects': tfds.features.Scalar(np.int32),
            'objects': tfds.features.Sequence({
                'shape': tfds.features.ClassLabel(names=SHAPES),
                'colour': tfds.features.ClassLabel(names=COLOURS),
                'size': tfds.features.ClassLabel(names=SIZES),
                'x': np.float32,
                'y': np.float32,
            }),
            'questions': tfds.features.Sequence(tfds.features.Text(),
                                                length=NUM_QUESTIONS),
            'answers': tfds.features.Sequence(tfds.features.Text(),
                                              length=NUM_QUESTIONS),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # rendered locally: nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    examples = self._generate_scenes(split)
    if config.spoken:
      longest = self.info.metadata.setdefault('longest_clip_seconds', {})
      examples = spoken.add_speech(examples, config.seed, SPLITS.index(split), split,
                                   longest.setdefault(split, {}))
    yield from examples

  def _generate_scenes(self, split: str):
    config = self.builder_config
    split_id = SPLITS.index(split)
    for index in range(config.num_examples(split)):
      rng = np.random.default_rng([config.seed, split_id, index])
      example = render_example(rng, config.image_size)
      del example['relation'], example['masks']   # not features (relation: in the captions)
      example['image'] = encode_png(example['image'])
      yield index, example
