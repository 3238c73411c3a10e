"""The image modality's preprocessing, shared by training, evaluation and the public API: decode,
resize (antialiased), colour jitter (training), normalise (to [-1, 1] by default); registered as
op 'image'.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmfusion import config as config_lib
from mmfusion.data import ops
from mmfusion.data.tf_lazy import tf  # imported at first use

# Colour jitter ranges, small enough that no colour name changes (hue is never touched):
# brightness shifts by up to +-BRIGHTNESS (images in [0, 1]), contrast and saturation
# scale by 1 +- CONTRAST and 1 +- SATURATION.
BRIGHTNESS = 0.06
CONTRAST = 0.15
SATURATION = 0.2
NUM_JITTER_PARAMS = 3

# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded PNG/JPEG/... bytes [] -> uint8 [H, W, 3] (grey images get 3 channels)."""
  return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [size, size, 3], antialiased; the aspect ratio is not kept
  (cropping could cut off the objects and positions that captions talk about)."""
  resized = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def to_unit_range(images: tf.Tensor) -> tf.Tensor:
  """uint8 -> float32 in [0, 1]."""
  return tf.cast(images, tf.float32) / 255.0


def normalize(images: tf.Tensor, mean: Sequence[float] = (0.5,) * 3,
              std: Sequence[float] = (0.5,) * 3) -> tf.Tensor:
  """float32 in [0, 1] -> (images - mean) / std per channel, what the image tower expects (by
  default [-1, 1]). Computed as images * (1 / std) + (-mean / std): for the default that is
  images * 2 - 1 exactly."""
  scale = tf.constant([1.0 / s for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  return images * scale + offset


def colour_jitter(images_bhwc: tf.Tensor, u_bp: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast and saturation jitter of a batch, one setting per image.

  images_bhwc: float32 [B, H, W, 3] in [0, 1]; u_bp: float32 [B, NUM_JITTER_PARAMS],
  uniform in [0, 1) (from stateless random ops, so the result is reproducible).
  Returns float32 [B, H, W, 3] in [0, 1].
  """
  scale = 2.0 * u_bp[:, None, None, :] - 1.0                 # [B, 1, 1, P] in [-1, 1)
  brightness = BRIGHTNESS * scale[..., 0:1]
  contrast = 1.0 + CONTRAST * scale[..., 1:2]
  saturation = 1.0 + SATURATION * scale[..., 2:3]
  x = images_bhwc + brightness
  mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * contrast + mean
  grey = tf.reduce_sum(x * tf.constant(_LUMA, tf.float32), axis=-1, keepdims=True)
  x = (x - grey) * saturation + grey
  return tf.clip_by_value(x, 0.0, 1.0)


@ops.register
class ImageOp(ops.Op):
  """Feature `image` (any size, 1 or 3 channels) -> image float32 [B, S, S, 3] in [-1, 1],
  S = config.data.image_size; in training with colour jitter (config.data.augment)."""
  name = 'image'
  num_random = NUM_JITTER_PARAMS
  feature_types = {'image': 'Image'}

  @property
  def size(self) -> int:
    return self.config.data.image_size

  def _known_shape(self) -> tuple[int, int] | None:
    height, width = self.source.features['image'].shape[:2]
    return (height, width) if height and width else None

  def normalize(self, images: tf.Tensor) -> tf.Tensor:
    return normalize(images, *config_lib.image_normalization(self.config))

  def spec(self, batch_size):
    return {'image': ((batch_size, self.size, self.size, 3), np.float32)}

  def bytes_per_example(self):
    return self.size * self.size * 3

  def standardize(self, ex):
    return {'image': ex['image']}        # still encoded: decoding waits for `decode`

  def decode(self, ex):
    image = decode_image(ex['image'])
    known = self._known_shape()
    if known:
      return {'image': tf.ensure_shape(image, (*known, 3))}
    return {'image': resize_image(image, self.size)}

  def decode_batch(self, batch):
    # Images of one known size are resized a batch at a time: 3x faster than one by one.
    if self._known_shape():
      return {'image': resize_image(batch['image'], self.size)}
    return {}

  def train(self, batch, u):
    images = to_unit_range(batch['image'])
    if self.config.data.augment:
      images = colour_jitter(images, u)
    return {'image': self.normalize(images)}

  def eval(self, batch):
    return {'image': self.normalize(to_unit_range(batch['image']))}

  def from_raw(self, values: Any) -> dict[str, np.ndarray]:
    """Images [N, H, W, C] or a list of [H, W, C] or [H, W] arrays or PIL images (uint8, or
    float in [0, 1]; C = 1, 3, or 4, whose alpha is dropped), or one such image, of any size."""
    if _is_one_image(values):
      values = [values]
    batch = []
    for image in values:
      if hasattr(image, 'convert') and hasattr(image, 'mode'):      # PIL
        image = image.convert('RGB') if image.mode not in ('L', 'RGB') else image
      image = np.asarray(image)
      if image.ndim == 2:
        image = image[..., None]
      if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
      if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f'an image must be [H, W, 1 or 3]; got shape {image.shape}')
      if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
      image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
      batch.append(resize_image(tf.constant(image), self.size))
    return {'image': self.eval({'image': tf.stack(batch)})['image'].numpy()}


def _is_one_image(values: Any) -> bool:
  """A PIL image, or an array [H, W] / [H, W, C<=4] rather than a batch of them."""
  if hasattr(values, 'convert') and hasattr(values, 'mode'):
    return True
  return (isinstance(values, np.ndarray) and values.dtype != object
          and (values.ndim == 2 or values.ndim == 3 and values.shape[-1] in (1, 3, 4)))
