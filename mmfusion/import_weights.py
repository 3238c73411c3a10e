r"""Public CLIP / SigLIP weights as an mmfusion workdir.

  python -m mmfusion.import_weights --source hf --checkpoint PATH --workdir OUT
      [--tokenizer FILE] [--image_size S] [--activation A] [--image_heads H --text_heads H]

Sources (mmfusion/weights/readers.py): `openai` (OpenAI CLIP state dicts or TorchScript
archives, QuickGELU), `open_clip` (open_clip state dicts; GELU unless --activation says
otherwise), `hf` (a Hugging Face CLIPModel / SiglipModel directory: config.json,
model.safetensors and its tokenizer), `big_vision` (a SigLIP .npz).

OUT gets a config (the towers, embedding size, logit scale and bias, the objective, the image
size and normalisation, the tokenizer and its conventions), the tokenizer file, and one orbax
checkpoint (step 0) of the parameters: `mmfusion.load_run(OUT)` embeds with it and a fine-tuning
config starts from it with `--config.init_from.path=OUT` (its towers set to the imported ones).
The tokenizer comes with the weights: a Hugging Face directory holds it; for the other sources
give --tokenizer (CLIP's tokenizer.json for openai / open_clip, the sentencepiece .model for
big_vision). --image_size resamples the image position embeddings (bilinear) for another
resolution. A tensor the import cannot place, or a tokenizer whose vocabulary does not fit the
embedding table, stops it with a message naming it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence

import numpy as np

from mmfusion import config as config_lib
from mmfusion.weights import readers
from mmfusion.weights.tensors import WeightsError

# The sources whose checkpoints carry no tokenizer, and what to give.
TOKENIZER_HINT = {'openai': "CLIP's tokenizer.json (from a Hugging Face CLIP repository)",
                  'open_clip': "CLIP's tokenizer.json (from a Hugging Face CLIP repository)",
                  'big_vision': 'the sentencepiece .model the weights were trained with',
                  'hf': 'tokenizer.json or spiece.model'}
# A sigmoid loss has no temperature clamp (SigLIP); the config still needs a bound.
SIGMOID_TEMPERATURE_MAX = 1e4


def make_config(imported: readers.Imported, tokenizer_path: str) -> config_lib.ConfigDict:
  """A run's config for the imported model: the base config with its towers, preprocessing,
  tokenizer and contrastive objective."""
  config = config_lib.base()
  model = config.model
  model.towers = imported.towers
  model.embed_dim = imported.embed_dim
  model.scan_layers = False
  temperature = readers.temperature(imported.params)
  model.temperature_init = temperature
  model.temperature_max = (max(100.0, temperature) if imported.objective == 'softmax_contrastive'
                           else SIGMOID_TEMPERATURE_MAX)
  model.bias_init = float(imported.params['logit_bias'])
  config.objectives = {imported.objective: dict(weight=1.0, pairs=(('image', 'text'),))}
  config.data.image_size = imported.image_size
  config.data.image_mean = tuple(float(v) for v in imported.image_mean)
  config.data.image_std = tuple(float(v) for v in imported.image_std)
  config.tokenizer.model = tokenizer_path
  config.tokenizer.max_len = imported.max_len
  config.tokenizer.pad_id = imported.pad_id
  config.tokenizer.attend_padding = imported.attend_padding
  return config_lib.lock(config)


def check_fits(config: config_lib.ConfigDict, params: dict, vocab_size: int) -> None:
  """The params have exactly the shapes of the model the config builds (else WeightsError
  listing the differences)."""
  import jax   # noqa: PLC0415

  from mmfusion import checkpoint as ckpt_lib
  from mmfusion import train
  from mmfusion.models import model as model_lib
  model = model_lib.build(config.model, vocab_size)
  abstract = jax.eval_shape(model.init, jax.random.key(0), train.init_batch(config))['params']
  expected = ckpt_lib.flatten(jax.tree.map(lambda x: getattr(x, 'value', x), abstract,
                                           is_leaf=lambda x: hasattr(x, 'value')))
  diff = ckpt_lib.shape_diff(expected, ckpt_lib.flatten(params), 'model', 'import')
  if diff:
    raise WeightsError('the imported tensors do not fit the model their config builds:\n'
                       + '\n'.join(diff[:20]))


def run_import(source: str, checkpoint: str, workdir: str, *, tokenizer: str = '',
               image_size: int | None = None, activation: str = '', image_heads: int = 0,
               text_heads: int = 0) -> str:
  """Imports `checkpoint` into a new workdir; returns its step directory."""
  from mmfusion import checkpoint as ckpt_lib   # noqa: PLC0415
  from mmfusion.data import tokenizer as tokenizer_lib

  if source not in readers.READERS:
    raise WeightsError(f'--source {source!r}; known: {sorted(readers.READERS)}')
  kwargs = dict(image_size=image_size)
  if source in ('openai', 'open_clip'):
    kwargs.update(activation=activation or ('quick_gelu' if source == 'openai' else 'gelu_erf'),
                  image_heads=image_heads, text_heads=text_heads)
  elif activation or image_heads or text_heads:
    raise WeightsError(f'--activation / --*_heads are for openai and open_clip; a {source} '
                       'checkpoint says them itself.')
  if not tokenizer and source != 'hf':
    raise WeightsError(f'a {source} checkpoint carries no tokenizer: give --tokenizer '
                       f'({TOKENIZER_HINT[source]}).')
  imported = readers.READERS[source](checkpoint, **kwargs)
  tokenizer = tokenizer or imported.tokenizer
  if not tokenizer:
    raise WeightsError(f'a {source} checkpoint carries no tokenizer: give --tokenizer '
                       f'({TOKENIZER_HINT[source]}).')
  if not os.path.exists(tokenizer):
    raise WeightsError(f'tokenizer not found: {tokenizer}')
  if os.path.exists(os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)):
    raise WeightsError(f'{workdir} already holds checkpoints; give an empty directory.')
  os.makedirs(workdir, exist_ok=True)
  suffix = '.json' if tokenizer.endswith('.json') else '.model'
  kept = os.path.join(os.path.abspath(workdir), 'tokenizer' + suffix)
  shutil.copyfile(tokenizer, kept)
  config = make_config(imported, kept)
  vocab = tokenizer_lib.load(kept).vocab_size
  rows = imported.params['text']['token_embedding']['embedding'].shape[0]
  if vocab != rows:
    raise WeightsError(f'tokenizer {tokenizer} has {vocab} ids, the text embedding table '
                       f'{rows} rows: not the tokenizer of these weights.')
  params = _as_float32(imported.params)
  check_fits(config, params, vocab)
  meta = {'step': 0, 'imported_from': os.path.abspath(checkpoint), 'source': source,
          'notes': imported.notes}
  return ckpt_lib.write_workdir(workdir, 0, {'params': params}, config, meta)


def _as_float32(tree):
  if isinstance(tree, dict):
    return {k: _as_float32(v) for k, v in tree.items()}
  return np.array(tree, dtype=np.float32, order="C")   # ascontiguousarray makes 0-d 1-d


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m mmfusion.import_weights',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--source', required=True, choices=sorted(readers.READERS))
  parser.add_argument('--checkpoint', required=True,
                      help='the weights file (a Hugging Face model directory for --source hf)')
  parser.add_argument('--workdir', required=True, help='the new workdir')
  parser.add_argument('--tokenizer', default='', help='tokenizer.json or a sentencepiece .model')
  parser.add_argument('--image_size', type=int, default=None,
                      help='resample the image position embeddings for this resolution')
  parser.add_argument('--activation', default='',
                      help='openai / open_clip: quick_gelu, gelu_erf or gelu_tanh')
  parser.add_argument('--image_heads', type=int, default=0, help='default: width / 64')
  parser.add_argument('--text_heads', type=int, default=0, help='default: width / 64')
  args = parser.parse_args(argv)
  from mmfusion import checkpoint as ckpt_lib   # noqa: PLC0415
  try:
    written = run_import(args.source, args.checkpoint, args.workdir, tokenizer=args.tokenizer,
                         image_size=args.image_size, activation=args.activation,
                         image_heads=args.image_heads, text_heads=args.text_heads)
  except (WeightsError, ckpt_lib.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f'mmfusion.import_weights: {e}', file=sys.stderr)
    return 1
  print(f'imported {args.source} weights from {args.checkpoint} into {written}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
