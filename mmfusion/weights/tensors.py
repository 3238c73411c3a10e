"""A checkpoint's named arrays as a source of weights: every array is taken at most once, so what
an import did not take is known and named, never silently dropped."""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np


class WeightsError(ValueError):
  """A checkpoint that cannot be read, or that does not map onto a model mmfusion builds."""


class Tensors:
  """name -> float32 numpy array, with a record of which names were taken."""

  def __init__(self, arrays: Mapping[str, np.ndarray], origin: str):
    self.arrays = dict(arrays)
    self.origin = origin
    self.taken: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.arrays

  def take(self, name: str) -> np.ndarray:
    if name not in self.arrays:
      near = sorted(k for k in self.arrays if k.rsplit('.', 1)[0] in name or name in k)[:5]
      raise WeightsError(f'{self.origin} has no tensor {name!r}' +
                         (f'; near names: {near}' if near else '') + '.')
    self.taken.add(name)
    return np.asarray(self.arrays[name], np.float32)

  def skip(self, names: Iterable[str]) -> None:
    """Marks buffers that carry no weights (attention masks, position ids) as handled."""
    self.taken.update(n for n in names if n in self.arrays)

  def count(self, pattern: str) -> int:
    """How many consecutive layers `pattern.format(i)` names (as a prefix of some tensor)."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in self.arrays):
      n += 1
    return n

  def untaken(self) -> list[str]:
    return sorted(set(self.arrays) - self.taken)

  def check_all_taken(self) -> None:
    left = self.untaken()
    if left:
      shown = ', '.join(left[:20]) + (f' and {len(left) - 20} more' if len(left) > 20 else '')
      raise WeightsError(f'{self.origin}: {len(left)} tensors have no place in the model '
                         f'mmfusion builds from it, so the import stops rather than guess: '
                         f'{shown}.')


def read(path: str) -> dict[str, np.ndarray]:
  """The named arrays of a `.safetensors`, `.npz` or PyTorch (`.pt` / `.pth` / `.bin`, a state
  dict or a TorchScript archive such as OpenAI's) file, as numpy."""
  if not os.path.exists(path):
    raise WeightsError(f'checkpoint not found: {path}')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as e:         # safetensors raises its own error types
      raise WeightsError(f'not a readable safetensors file: {path} ({e})') from None
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise WeightsError(f'not a readable .npz file: {path} ({e})') from None
  return _read_torch(path)


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise WeightsError(f'{path} is a PyTorch file: reading it needs torch (pip install torch), '
                       'or give the .safetensors version of the checkpoint.') from None
  try:
    try:
      state = torch.jit.load(path, map_location='cpu').state_dict()    # OpenAI's archives
    except RuntimeError:
      state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:           # torch raises many types for a file that is not its own
    raise WeightsError(f'not a readable PyTorch checkpoint: {path} ({e})') from None
  if isinstance(state, Mapping) and 'state_dict' in state:
    state = state['state_dict']                # open_clip's training checkpoints
  if not isinstance(state, Mapping):
    raise WeightsError(f'{path} holds a {type(state).__name__}, not a state dict.')
  out = {}
  for name, value in state.items():
    if hasattr(value, 'detach'):
      name = name[len('module.'):] if name.startswith('module.') else name   # DDP's prefix
      out[name] = value.detach().float().cpu().numpy()
  return out
