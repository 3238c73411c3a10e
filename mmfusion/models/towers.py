"""Tower registry: `config.model.towers.<modality> = dict(type=..., ...)` -> the Flax module that
encodes that modality. Built-in types register themselves where they are defined ('vit' in
vit.py, 'text' in text.py); a new modality registers its type here and needs no other change.

Every tower is called as `tower(inputs, mask=None, train=False)`, where inputs and mask are the
batch's `<modality>` and `<modality>_mask` entries, and returns `Encoded`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers

Array = jax.Array
Dtype = Any


class Encoded(NamedTuple):
  """One modality's tower outputs. tokens and pooled are in the compute dtype."""
  tokens: Array       # [B, N, W] per-token features
  mask: Array         # [B, N] bool, True = a real token (aligned with tokens)
  pooled: Array       # [B, W] the summary before the projection
  embedding: Array    # [B, D] projection of pooled into the shared space, NOT normalised


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What every tower is built with besides its own options: the shared embedding size, the
  vocabulary of token inputs, and the model's compute settings (config.model)."""
  embed_dim: int
  vocab_size: int = 0            # for towers that take token ids (the tokenizer's, + extra ids)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = 'auto'        # 'auto' | one of layers.ATTENTION_IMPLS
  remat: str = 'none'
  remat_save: tuple[str, ...] = ()
  scan_layers: bool = False
  sow_attention: bool = False
  lora: layers.LoraOptions | None = None     # adapters on every stack's projections
  quantize: str = ''                         # layers.QUANTIZE: the stacks' matmuls

  def stack(self, options: Mapping[str, Any], **sizes: int) -> layers.StackOptions:
    """StackOptions from a config dict's width / depth / mlp_dim / num_heads / dropout (and
    activation / norm_eps where the tower type takes them; `sizes` override the sizes: a
    variant's), with this context's compute settings. Attention
    weights are recorded only with the 'explicit' implementation, which sow_attention forces."""
    sizes = {k: sizes.get(k, options[k]) for k in ('width', 'depth', 'mlp_dim', 'num_heads')}
    impl = 'explicit' if self.sow_attention else layers.resolve_attention_impl(
        self.attention, self.dtype, sizes['width'] // max(sizes['num_heads'], 1))
    return layers.StackOptions(
        **sizes, dropout=options.get('dropout', 0.0), attention_impl=impl,
        activation=options.get('activation', 'gelu_tanh'), norm_eps=options.get('norm_eps', 1e-6),
        sow_weights=self.sow_attention, remat=self.remat, remat_save=tuple(self.remat_save),
        scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype,
        lora=self.lora, quantize=self.quantize)


@dataclasses.dataclass(frozen=True)
class TowerType:
  make: Callable[[dict[str, Any], BuildContext], nn.Module]
  options: Mapping[str, Any]       # every key its config dict may set, with the defaults
  takes_tokens: bool = False       # inputs are token ids: built with the tokenizer's vocab


REGISTRY: dict[str, TowerType] = {}


def register(name: str, *, options: Mapping[str, Any], takes_tokens: bool = False):
  """Decorator: `make(options, context) -> module` becomes tower type `name`. `options` are the
  keys a config may set (besides `type`) with their defaults."""
  def wrap(make):
    REGISTRY[name] = TowerType(make, dict(options), takes_tokens)
    return make
  return wrap


def tower_type(modality: str, tower_config: Mapping[str, Any]) -> TowerType:
  kind = dict(tower_config).get('type') if hasattr(tower_config, 'keys') else None
  if kind not in REGISTRY:
    raise ValueError(f'config.model.towers.{modality}.type = {kind!r}: unknown tower type; '
                     f'known: {sorted(REGISTRY)}.')
  return REGISTRY[kind]


def options(modality: str, tower_config: Mapping[str, Any]) -> dict[str, Any]:
  """The tower's options, defaults filled in; a key its type does not take fails, naming it."""
  kind = tower_type(modality, tower_config)
  given = {k: v for k, v in tower_config.items() if k != 'type'}
  unknown = sorted(set(given) - set(kind.options))
  if unknown:
    raise ValueError(f'config.model.towers.{modality} has {unknown}, which tower type '
                     f"{tower_config['type']!r} does not take; it takes {sorted(kind.options)}.")
  return {**kind.options, **given}


def build(modality: str, tower_config: Mapping[str, Any], context: BuildContext) -> nn.Module:
  """The (unbound) tower module for `config.model.towers.<modality>`; bad values fail here."""
  kind = tower_type(modality, tower_config)
  try:
    return kind.make(options(modality, tower_config), context)
  except ValueError as e:
    if str(e).startswith('config.'):
      raise
    raise ValueError(f'config.model.towers.{modality}: {e}') from e


def adversarial_hook(tower: nn.Module, x_bnw: Array) -> Array:
  """A tower's token / patch embeddings (after the position embedding) plus the perturbation
  that adversarial training passes in the 'adversarial' collection (mmfusion/adversarial.py,
  FreeLB / VILLA); unchanged when none is passed, and never created at init."""
  if tower.is_initializing():
    return x_bnw
  return tower.perturb('embedded', x_bnw, collection='adversarial')


def projection(embed_dim: int, stack: layers.StackOptions) -> nn.Dense:
  """Dense 'proj' from a tower's pooled vector into the shared embedding space. The output dim
  is left unnamed: naming it 'embed' too would repeat a logical axis."""
  return nn.Dense(
      embed_dim, dtype=stack.dtype, param_dtype=stack.param_dtype,
      kernel_init=layers.named_init(nn.initializers.lecun_normal(), ('embed', None)),
      bias_init=layers.named_init(nn.initializers.zeros, (None,)), name='proj')
