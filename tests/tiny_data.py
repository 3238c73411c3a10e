"""The tiny variant of the embedded dataset and batch helpers, shared by the data test modules
(its fixtures, `data_dir`, `config`, `source`, `tok`, `sharding`, are in conftest.py)."""
import numpy as np

from mmfusion import config as config_lib

BATCH = 32                     # tiny has 256 train examples: 8 steps per epoch
MAX_LEN = 20


def make_config(data_dir, **data):
  config = config_lib.base()
  config.data.data_dir = str(data_dir)
  config.data.builder_config = 'tiny'
  config.data.shuffle_buffer = 100
  config.data.update(data)
  config.batch_size = BATCH
  config.tokenizer.vocab_size = 128
  config.tokenizer.max_len = MAX_LEN
  return config


def take(iterator, n):
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def assert_same_batches(xs, ys, keys=None):
  """Equal batch by batch: every key (the same keys in both), or only `keys`."""
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    if keys is None:
      assert x.keys() == y.keys()
    for k in keys or x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
