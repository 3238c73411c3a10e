"""The synthetic batch every benchmarked step trains on: host numpy arrays with the shapes and
token conventions of the real pipeline, built once and shared by mmfusion and its peers.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from mmfusion.data import tokenizer

FIRST_TEXT_ID = max(tokenizer.PAD_ID, tokenizer.UNK_ID, tokenizer.BOS_ID, tokenizer.EOS_ID) + 1


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """image float32 [B,H,W,3] N(0,1) noise; text int32 [B,L]: random ids, EOS at a random real
  length, pad id after it; text_mask bool [B,L] True on the real tokens (EOS included)."""
  size, length = config.data.image_size, config.tokenizer.max_len
  vocab = config.tokenizer.vocab_size
  if vocab <= FIRST_TEXT_ID:
    raise ValueError(f'config.tokenizer.vocab_size = {vocab}: needs more than the '
                     f'{FIRST_TEXT_ID} special ids for a synthetic text batch.')
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
  real_b = rng.integers(1, length + 1, size=batch_size)             # EOS included
  position_l = np.arange(length)
  text = rng.integers(FIRST_TEXT_ID, vocab, size=(batch_size, length), dtype=np.int32)
  text = np.where(position_l < real_b[:, None] - 1, text, tokenizer.PAD_ID).astype(np.int32)
  text[np.arange(batch_size), real_b - 1] = tokenizer.EOS_ID
  mask = position_l < real_b[:, None]
  return {'image': image, 'text': text, 'text_mask': mask}
