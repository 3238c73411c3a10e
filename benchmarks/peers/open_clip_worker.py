"""open_clip's training step, timed in a process of its own: `python -m benchmarks.peers.open_clip_worker
DIR` reads DIR/spec.json and DIR/batch.npz (written by open_clip_step.start), builds the step,
then times blocks of steps on request (benchmarks/peers/protocol.py).

A separate process because torch's import of triton registers LLVM command-line options that
jaxlib has already registered in the same process, which aborts it ("Option ... registered
more than once"); it also keeps each framework's GPU memory and host RSS its own, and lets the peer
run under another interpreter (a virtual environment with torch and open_clip). So this module
imports neither JAX, TensorFlow nor mmfusion.

The step is open_clip's training loop with accumulation 1: zero_grad(set_to_none), forward
under autocast (bfloat16 over float32 params, open_clip's `--precision amp_bf16`) or in
float32, ClipLoss, backward, gradient-norm clipping, AdamW (no decay on gains, biases and the
logit scale), clamp of the logit scale.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import numpy as np

from benchmarks import environment
from benchmarks.peers import protocol

INSTALL_HINT = "pip install -e '.[bench]'"


def _import():
  try:
    import torch
    import open_clip
  except ImportError as e:
    raise ImportError(f'the open_clip peer needs torch and open_clip_torch ({e}). Install them '
                      f'with `{INSTALL_HINT}`, or pass --peer none.') from e
  return torch, open_clip


def _optimizer(torch, model, optim: dict[str, float]):
  exclude = lambda n, p: p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  return torch.optim.AdamW(
      [{'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.0},
       {'params': [p for n, p in named if not exclude(n, p)], 'weight_decay': optim['weight_decay']}],
      lr=optim['lr'], betas=(optim['b1'], optim['b2']), eps=optim['eps'])


def build(spec: dict[str, Any], batch: dict[str, np.ndarray]):
  """(step, sync, ready, info) for protocol.serve: open_clip's model, optimizer and step on
  `batch`, on the GPU when torch sees one."""
  torch, open_clip = _import()
  use_cuda = torch.cuda.is_available()
  device = torch.device('cuda' if use_cuda else 'cpu')
  if use_cuda:
    torch.backends.cuda.matmul.allow_tf32 = True      # JAX's default for float32 on GPU
    torch.backends.cudnn.allow_tf32 = True
  else:
    # XLA's CPU backend uses every core this process may run on; so does the peer.
    torch.set_num_threads(environment.cpu_cores())
  torch.manual_seed(spec['seed'])

  model = open_clip.model.CLIP(spec['embed_dim'], vision_cfg=spec['vision_cfg'],
                               text_cfg=spec['text_cfg'], init_logit_scale=spec['init_logit_scale'])
  model = model.to(device).train()
  optimizer = _optimizer(torch, model, spec['optim'])
  forward = torch.compile(model) if spec['compile'] else model
  loss_fn = open_clip.ClipLoss()
  amp = spec['precision'] == 'amp_bf16'
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp \
      else contextlib.nullcontext
  clip_norm, max_log_scale = spec['optim']['clip_norm'], spec['max_log_scale']

  images = torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2))).to(device)
  texts = torch.from_numpy(batch['text'].astype(np.int64)).to(device)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      image_features, text_features, logit_scale = forward(images, texts)
      loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    if clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm, norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, max_log_scale)
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if use_cuda else (lambda _: None)
  ready = {
      'name': 'open_clip',
      'platform': 'gpu' if use_cuda else 'cpu',
      'device': torch.cuda.get_device_name(device) if use_cuda
                else f'cpu ({torch.get_num_threads()} threads)',
      'precision': spec['precision'],
      'compiled': spec['compile'],
      'params': sum(p.numel() for p in model.parameters()),
      'versions': {'torch': torch.__version__, 'open_clip': open_clip.__version__},
  }

  def info():
    return {'device_peak_bytes': torch.cuda.max_memory_allocated(device) if use_cuda else None}

  return step, sync, ready, info


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit(f'usage: python -m benchmarks.peers.open_clip_worker DIR (got {argv[1:]})')
  directory = argv[1]
  with open(os.path.join(directory, 'spec.json')) as f:
    spec = json.load(f)
  with np.load(os.path.join(directory, 'batch.npz')) as data:
    batch = {k: data[k] for k in data.files}
  protocol.serve(*build(spec, batch))


if __name__ == '__main__':
  main(sys.argv)
