"""What a transformer stack's projections can carry besides their weights: low-rank adapters
(LoRA, config.model.peft) and AQT's int8 matmul (config.model.quantize). models/layers.py
builds them into HeadsDense; optim.py freezes around the adapters; peft.py merges them."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


# LoRA targets (config.model.peft.targets) -> the projection layers they adapt, by module name.
LORA_TARGETS = {'qkv': ('query', 'key', 'value'), 'attn_out': ('out',), 'mlp': ('fc1', 'fc2')}
LORA_PARAMS = ('lora_a', 'lora_b')


# config.model.quantize: '' (float matmuls) or 'int8' (AQT: the forward pass of every stack's
# projections multiplies int8 weights by int8 activations, per-channel scales; the gradients
# stay in float).
QUANTIZE = ('', 'int8')


def aqt_dot_general(kind: str) -> nn.Module:
  """Google AQT's dot_general module for `kind` ('int8'); the library is the [quantize] extra."""
  try:
    from aqt.jax.v2 import config as aqt_config
    from aqt.jax.v2.flax import aqt_flax
  except ImportError as e:
    raise ValueError(f"config.model.quantize = {kind!r} needs Google's AQT library: pip install "
                     "'mmfusion[quantize]' (the aqtp package).") from e
  # prng_name=None: no stochastic rounding, so evaluation needs no random key.
  return aqt_flax.AqtDotGeneral(aqt_config.fully_quantized(fwd_bits=8, bwd_bits=None),
                                prng_name=None)


@dataclasses.dataclass(frozen=True)
class LoraOptions:
  """Low-rank adapters (Hu et al. 2021) on a stack's projections: W + (alpha / rank) A B, with A
  [in, rank] initialised like PEFT's (uniform, +-1/sqrt(fan in)) and B [rank, out] at zero, so an
  adapted model starts equal to its base."""
  rank: int
  alpha: float
  targets: tuple[str, ...]

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'peft.rank = {self.rank!r}: must be an integer >= 1')
    if not self.alpha > 0:
      raise ValueError(f'peft.alpha = {self.alpha!r}: must be > 0')
    unknown = [t for t in self.targets if t not in LORA_TARGETS]
    if unknown or not self.targets:
      layers = ', '.join(f'{k}: {"/".join(v)}' for k, v in LORA_TARGETS.items())
      raise ValueError(f'peft.targets = {tuple(self.targets)!r}: {unknown or "none given"}; the '
                       f'layers LoRA can adapt are {sorted(LORA_TARGETS)} ({layers}).')

  def rank_for(self, layer: str) -> int:
    """The adapter rank of the projection named `layer` (0: not adapted)."""
    return self.rank if any(layer in LORA_TARGETS[t] for t in self.targets) else 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_merged(kernel: Array, a: Array, b: Array, scale: float) -> Array:
  """W + scale * A B: A [*in, r], B [r, *out], W [*in, *out]."""
  return kernel + (scale * jnp.tensordot(a, b, axes=1)).astype(kernel.dtype)
