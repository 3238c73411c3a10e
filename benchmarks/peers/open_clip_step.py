"""The open_clip peer: open_clip's `CLIP` with the architecture of an mmfusion config, trained with
open_clip's own step on the same batch and precision (run by open_clip_worker.py, in a process
of its own, which the benchmark alternates with mmfusion: protocol.py).

torch and open_clip_torch are an optional dependency (`pip install -e '.[bench]'`), or live in
another interpreter's environment (`--peer_python`); this module only checks that they are
installed and never imports them. Precision: float32, or
for bfloat16 compute `torch.autocast(bfloat16)` over float32 params (open_clip's
`--precision amp_bf16`); float32 matmuls run as TF32 on GPU, as JAX's default precision does
there. Eager by default; `compile=True` wraps the model in `torch.compile`.

What differs from mmfusion's CLIP, none of it material to speed: open_clip's image tower has
a LayerNorm before the encoder (ln_pre) and a bias-free patch embedding, both towers project
without bias, its GELU is exact (mmfusion's is the tanh approximation), its attention uses a
fused in-projection, and its text tower applies only the causal mask (mmfusion also masks
padding keys; the EOS token, where both pool, sees no padding either way).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Any, Sequence

import ml_collections
import numpy as np

from benchmarks import environment
from benchmarks.peers import protocol
from mmfusion.data import tokenizer
from mmfusion.models import layers

INSTALL_HINT = "pip install -e '.[bench]'"
IMAGE_POOLS = {'cls': 'tok', 'gap': 'avg'}      # mmfusion pool -> open_clip pool_type
TEXT_POOLS = {'eos': 'eos', 'last': 'last'}
PRECISIONS = {'float32': 'float32', 'bfloat16': 'amp_bf16'}


PACKAGES = ('torch', 'open_clip')


def _missing(python: str) -> Sequence[str]:
  # Not realpath: every virtual environment's python links to the same base interpreter.
  if os.path.abspath(python) == os.path.abspath(sys.executable):
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]
  code = ('import importlib.util, json; '
          f'print(json.dumps([n for n in {PACKAGES!r} if importlib.util.find_spec(n) is None]))')
  try:
    found = subprocess.run([python, '-c', code], capture_output=True, text=True, timeout=120)
  except OSError as e:
    raise ImportError(f'--peer_python {python}: cannot run it ({e}).') from None
  if found.returncode != 0:
    raise ImportError(f'--peer_python {python}: it failed to start: {found.stderr.strip()[-500:]}')
  return json.loads(found.stdout)


def check_installed(python: str = sys.executable) -> None:
  """One ImportError that says how to install the peer's packages, without importing them
  (in `python`, the interpreter the peer will run under)."""
  missing = _missing(python)
  if missing:
    where = '' if python == sys.executable else f' under {python}'
    raise ImportError(f'the open_clip peer needs torch and open_clip_torch ({", ".join(missing)} '
                      f'not found{where}). Install them with `{INSTALL_HINT}`, point '
                      '--peer_python at an interpreter that has them, or pass --peer none.')


def _sizes(tower_config: ml_collections.ConfigDict) -> dict[str, int]:
  sizes = dict(width=tower_config.width, depth=tower_config.depth,
               mlp_dim=tower_config.mlp_dim, num_heads=tower_config.num_heads)
  sizes.update(layers.decode_variant(tower_config.variant))
  return sizes


def spec(config: ml_collections.ConfigDict, *, compile: bool = False) -> dict[str, Any]:
  """What the worker builds and runs, as JSON-able values; a ValueError naming the config key
  for anything open_clip's CLIP or this peer cannot express."""
  model = config.model
  if model.towers.image.pool not in IMAGE_POOLS:
    raise ValueError(f'config.model.towers.image.pool={model.towers.image.pool!r}: the open_clip peer supports '
                     f'{sorted(IMAGE_POOLS)}.')
  if model.towers.text.pool not in TEXT_POOLS:
    raise ValueError(f'config.model.towers.text.pool={model.towers.text.pool!r}: the open_clip peer supports '
                     f'{sorted(TEXT_POOLS)}.')
  if model.dtype not in PRECISIONS:
    raise ValueError(f'config.model.dtype={model.dtype!r}: the open_clip peer runs '
                     f'{sorted(PRECISIONS)}.')
  if model.param_dtype != 'float32':
    raise ValueError(f'config.model.param_dtype={model.param_dtype!r}: the open_clip peer keeps '
                     'float32 params, as open_clip trains.')
  image, text = _sizes(model.towers.image), _sizes(model.towers.text)
  vision_cfg = dict(
      image_size=config.data.image_size,
      patch_size=layers.decode_variant(model.towers.image.variant).get('patch_size', model.towers.image.patch_size),
      width=image['width'], layers=image['depth'], head_width=image['width'] // image['num_heads'],
      mlp_ratio=image['mlp_dim'] / image['width'], pool_type=IMAGE_POOLS[model.towers.image.pool])
  text_cfg = dict(
      context_length=config.tokenizer.max_len, vocab_size=config.tokenizer.vocab_size,
      width=text['width'], heads=text['num_heads'], layers=text['depth'],
      mlp_ratio=text['mlp_dim'] / text['width'], no_causal_mask=not model.towers.text.causal,
      pad_id=tokenizer.PAD_ID, eos_id=tokenizer.EOS_ID, pool_type=TEXT_POOLS[model.towers.text.pool])
  optim = {k: float(config.optim[k]) for k in ('lr', 'b1', 'b2', 'eps', 'weight_decay', 'clip_norm')}
  return {
      'embed_dim': model.embed_dim, 'vision_cfg': vision_cfg, 'text_cfg': text_cfg,
      'precision': PRECISIONS[model.dtype], 'optim': optim,
      'init_logit_scale': math.log(model.temperature_init),
      'max_log_scale': math.log(model.temperature_max),
      'seed': config.seed, 'compile': compile,
  }


def start(config: ml_collections.ConfigDict, batch_np: dict[str, np.ndarray], *,
          python: str = sys.executable, compile: bool = False) -> protocol.PeerProcess:
  """The open_clip worker, its step built on `batch_np` and ready to time blocks of steps."""
  check_installed(python)
  peer_spec = spec(config, compile=compile)
  # The worker reads the spec and the batch while it builds; the files go once it is ready.
  with tempfile.TemporaryDirectory(prefix='mmfusion_open_clip_') as directory:
    with open(os.path.join(directory, 'spec.json'), 'w') as f:
      json.dump(peer_spec, f)
    np.savez(os.path.join(directory, 'batch.npz'), image=batch_np['image'], text=batch_np['text'])
    return protocol.PeerProcess('open_clip', 'benchmarks.peers.open_clip_worker', directory,
                                python=python, cwd=environment.REPO_ROOT)
