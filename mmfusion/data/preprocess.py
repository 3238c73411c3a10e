"""Per-modality preprocessing ops on TensorFlow tensors, shared by training and evaluation.

Images: decode, resize (antialiased), colour jitter, normalise to [-1, 1]. Text: tokenize.
"""
from __future__ import annotations

import tensorflow as tf

from mmfusion.data import tokenizer as tokenizer_lib

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


def normalize(images: tf.Tensor) -> tf.Tensor:
  """float32 in [0, 1] -> float32 in [-1, 1], what the image tower expects."""
  return images * 2.0 - 1.0


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


def tokenize(tokenizer: tokenizer_lib.Tokenizer, texts: tf.Tensor,
             max_len: int) -> tuple[tf.Tensor, tf.Tensor]:
  """strings [...] -> (ids int32 [..., max_len], mask bool [..., max_len]) inside tf.data;
  call it on batches (see Tokenizer.tf_encode for when not to)."""
  return tokenizer.tf_encode(texts, max_len)
