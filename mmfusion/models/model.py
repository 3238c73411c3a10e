"""MultimodalModel: a dict of towers keyed by modality, the contrastive temperature and bias, an
optional fusion module and the task heads; `build` makes it from `config.model`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import fusion as fusion_lib
from mmfusion.models import heads as heads_lib
from mmfusion.models import layers
from mmfusion.models import towers as towers_lib

Array = jax.Array
Dtype = Any

# Random streams the forward pass draws from in training: dropout, the heads' (the ITM hard
# negatives, the MLM masks) and the audio front-end's SpecAugment masks. The trainer folds one
# key per stream from the step's key, by position: a new stream goes last, so the others keep
# their keys.
RNG_STREAMS = ('dropout',) + heads_lib.RNG_STREAMS + ('augment',)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# Names the model uses itself: no modality or head may take them (their params would clash).
RESERVED = ('logit_scale', 'logit_bias', 'fusion', 'towers', 'heads')


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  # Flooring the squared norm keeps a zero vector, and its gradient, free of NaN.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class MultimodalModel(nn.Module):
  """Towers by modality, logit scale / bias, a fusion module and heads.

  `__call__(batch, train=False)` runs the tower of every modality `m` the batch holds (inputs
  `batch[m]`, and `batch[f'{m}_mask']` where the modality has one), then every head that finds
  what it reads, and returns:
    embeddings[m] [B,D] float32, L2-normalised    tokens[m] [B,N,W]    masks[m] [B,N] bool
    pooled[m]     [B,W]
    logit_scale   scalar float32 = min(exp(logit_scale), temperature_max)
    logit_bias    scalar float32 (SigLIP's sigmoid loss uses it; CLIP ignores it)
    <head>        each head's outputs, keyed by its name (see models/heads.py).
  tokens and pooled stay in the compute dtype.

  Top-level params: one sub-tree per tower (named by its modality), logit_scale, logit_bias,
  fusion, and one per head (named as in config.model.heads); each only once it has run.
  Fine-tuning loads and freezes by these names.
  """
  towers: Mapping[str, nn.Module]
  heads: Mapping[str, nn.Module]
  fusion: fusion_lib.Fusion | None = None
  temperature_init: float = 1 / 0.07
  temperature_max: float = 100.0
  bias_init: float = 0.0
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.temperature_init <= 0 or self.temperature_max <= 0:
      raise ValueError(f'temperature_init={self.temperature_init} and temperature_max='
                       f'{self.temperature_max} must be positive')
    clash = sorted((set(self.towers) & set(self.heads)) | (set(self.towers) | set(self.heads))
                   & set(RESERVED))
    if clash:
      raise ValueError(f'names {clash} are taken twice (modalities, heads and {RESERVED} share '
                       'the param namespace)')
    super().__post_init__()

  def setup(self):
    # Each tower and head becomes a child named by its modality / head name, so the param tree
    # has one sub-tree per modality and per head, whatever the set of modalities.
    for name, module in {**self.towers, **self.heads}.items():
      setattr(self, name, module.clone(_deep_clone=True))
    scale_init = nn.initializers.constant(math.log(self.temperature_init))
    self.log_scale = self.param('logit_scale', layers.named_init(scale_init, ()), (),
                                self.param_dtype)
    self.bias = self.param('logit_bias',
                           layers.named_init(nn.initializers.constant(self.bias_init), ()), (),
                           self.param_dtype)

  def encode(self, modality: str, inputs: Array, mask: Array | None = None, *,
             train: bool = False) -> towers_lib.Encoded:
    """One modality's tower on its inputs (and mask)."""
    if modality not in self.towers:
      raise ValueError(f'the model has no tower for {modality!r}; it has {sorted(self.towers)}')
    return getattr(self, modality)(inputs, mask, train=train)

  def fuse(self, encoded: Mapping[str, towers_lib.Encoded], *, train: bool = False
           ) -> dict[str, Any]:
    """The fusion module on some modalities' tower outputs: see fusion.Fusion for the keys."""
    if self.fusion is None:
      raise ValueError('the model has no fusion module (config.model.fusion.strategy is empty)')
    return self.fusion({m: e.tokens for m, e in encoded.items()},
                       {m: e.mask for m, e in encoded.items()},
                       {m: e.pooled for m, e in encoded.items()}, train=train)

  def fused_logits(self, head: str, encoded: Mapping[str, towers_lib.Encoded]) -> Array:
    """A fused head's classifier on aligned tower outputs (e.g. ITM [B, 2] for re-ranking, VQA
    [B, A]): what evaluators call with tower outputs they computed once and paired up."""
    return getattr(self, head).logits(self.fuse(encoded)).astype(jnp.float32)

  def scale_and_bias(self) -> tuple[Array, Array]:
    # exp then clamp (CLIP): once exp(p) > temperature_max the gradient w.r.t. p is zero, so
    # the temperature stops growing.
    scale = jnp.minimum(jnp.exp(self.log_scale.astype(jnp.float32)), self.temperature_max)
    return scale, self.bias.astype(jnp.float32)

  def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Any]:
    return self.outputs(batch, self.encode_batch(batch, train=train), train=train)

  def encode_batch(self, batch: Mapping[str, Array], *, train: bool = False
                   ) -> dict[str, towers_lib.Encoded]:
    """The tower of every modality the batch holds: the part of the forward pass in which each
    example is computed on its own (gradient accumulation splits the batch here)."""
    return {m: self.encode(m, batch[m], batch.get(f'{m}_mask'), train=train)
            for m in self.towers if m in batch}

  def outputs(self, batch: Mapping[str, Array], encoded: Mapping[str, towers_lib.Encoded], *,
              train: bool = False) -> dict[str, Any]:
    """The rest of the forward pass, from the towers' outputs: embeddings, scale and bias, and
    the heads, which may mix examples (ITM's in-batch negatives) and run towers again (MLM's
    masked text)."""
    out: dict[str, Any] = {
        'embeddings': {m: l2_normalize(e.embedding.astype(jnp.float32))
                       for m, e in encoded.items()},
        'tokens': {m: e.tokens for m, e in encoded.items()},
        'pooled': {m: e.pooled for m, e in encoded.items()},
        'masks': {m: e.mask for m, e in encoded.items()},
    }
    out['logit_scale'], out['logit_bias'] = self.scale_and_bias()
    forward = heads_lib.Forward(
        batch=batch, encoded=encoded, embeddings=out['embeddings'],
        logit_scale=out['logit_scale'], encode=functools.partial(self.encode, train=train),
        fuse=functools.partial(self.fuse, train=train) if self.fusion is not None else None,
        train=train)
    for name in self.heads:
      result = getattr(self, name)(forward)
      if result is not None:
        out[name] = result
    return out


def _dtype(name: str, key: str) -> Dtype:
  if name not in DTYPES:
    raise ValueError(f'config.model.{key}={name!r}; expected one of {sorted(DTYPES)}')
  return DTYPES[name]


def build_context(model_config: Mapping[str, Any], vocab_size: int, *,
                  attention_impl: str | None = None,
                  sow_attention: bool = False) -> towers_lib.BuildContext:
  """The compute settings of `config.model` every tower, fusion and head is built with."""
  if attention_impl is None:
    attention_impl = 'explicit' if sow_attention else model_config['attention']
  if attention_impl != 'auto' and attention_impl not in layers.ATTENTION_IMPLS:
    raise ValueError(f'config.model.attention={attention_impl!r}; expected auto or one of '
                     f'{layers.ATTENTION_IMPLS}')
  quantize = dict(model_config).get('quantize', '')
  if quantize not in layers.QUANTIZE:
    raise ValueError(f'config.model.quantize = {quantize!r}; expected one of {layers.QUANTIZE}.')
  try:
    layers.remat_policy(model_config['remat'], tuple(model_config['remat_save']))
  except ValueError as e:
    raise ValueError(f'config.model.{e}') from e
  return towers_lib.BuildContext(
      lora=lora_options(model_config),
      quantize=quantize,
      embed_dim=model_config['embed_dim'], vocab_size=vocab_size,
      dtype=_dtype(model_config['dtype'], 'dtype'),
      param_dtype=_dtype(model_config['param_dtype'], 'param_dtype'),
      attention=attention_impl, remat=model_config['remat'],
      remat_save=tuple(model_config['remat_save']), scan_layers=model_config['scan_layers'],
      sow_attention=sow_attention)


def lora_options(model_config: Mapping[str, Any]) -> layers.LoraOptions | None:
  """`config.model.peft` as LoraOptions (None when its type is ''); a bad value raises naming
  the key. Configs saved before PEFT existed have no such key: no adapters."""
  peft = dict(dict(model_config).get('peft') or {})
  kind = peft.pop('type', '')
  if not kind:
    return None
  if kind != 'lora':
    raise ValueError(f"config.model.peft.type = {kind!r}; expected 'lora' or '' (none).")
  unknown = sorted(set(peft) - {'rank', 'alpha', 'targets', 'train'})
  if unknown:
    raise ValueError(f'config.model.peft has {unknown}; it takes type, rank, alpha, targets, '
                     'train.')
  try:
    return layers.LoraOptions(rank=peft.get('rank', 8), alpha=float(peft.get('alpha', 16.0)),
                              targets=tuple(peft.get('targets', tuple(layers.LORA_TARGETS))))
  except ValueError as e:
    raise ValueError(f'config.model.{e}') from None


def reads_tokens(model_config: Mapping[str, Any]) -> bool:
  """Whether the model needs the tokenizer's vocabulary: a tower that reads token ids, or a
  head that writes them."""
  return (any(towers_lib.tower_type(m, cfg).takes_tokens
              for m, cfg in dict(model_config['towers']).items())
          or bool({'mlm', 'caption'} & set(model_config['heads'])))


def build(model_config: Mapping[str, Any], vocab_size: int, *,
          attention_impl: str | None = None, sow_attention: bool = False) -> MultimodalModel:
  """MultimodalModel from `config.model` (see mmfusion/config.py) and the tokenizer's vocab size.

  Towers come from `towers.<modality>` (type registry in models/towers.py), the fusion module
  from `fusion` (its strategy's keys), heads from `heads`. attention_impl overrides
  `config.model.attention`; `sow_attention` records attention weights into 'intermediates',
  which needs (and then defaults to) the 'explicit' implementation. Bad values raise ValueError
  naming the config key, before any compute.
  """
  context = build_context(model_config, vocab_size, attention_impl=attention_impl,
                          sow_attention=sow_attention)
  tower_configs = dict(model_config['towers'])
  if not tower_configs:
    raise ValueError('config.model.towers is empty: give at least one modality a tower.')
  for m in tower_configs:
    # Towers become attributes of the model: a name it already uses would replace a method.
    if not m.isidentifier() or m in RESERVED or m in heads_lib.OPTIONS or hasattr(
        MultimodalModel, m):
      raise ValueError(f'config.model.towers.{m}: a modality name must be an identifier that '
                       f'the model does not use itself (not {RESERVED}, a head name '
                       f'{tuple(heads_lib.OPTIONS)}, or a method of the model).')
  head_options = heads_lib.options(model_config['heads'])
  for name, opts in head_options.items():
    for key, modality in heads_lib.modalities(name, opts).items():
      if modality not in tower_configs:
        raise ValueError(f'config.model.heads.{name}.{key} = {modality!r}: no such tower in '
                         f'config.model.towers (it has {sorted(tower_configs)}).')
  extra = heads_lib.mask_tokens_for(head_options)
  # Towers that read token ids get the tokenizer's vocabulary, plus MLM's [MASK] where masked.
  towers = {m: towers_lib.build(m, cfg, dataclasses.replace(
                context, vocab_size=vocab_size + extra.get(m, 0)))
            for m, cfg in tower_configs.items()}

  fusion = fusion_lib.build(model_config['fusion'], context.stack)
  if fusion is not None and fusion.strategy == 'cross_attention':
    for role in ('query', 'context'):
      if getattr(fusion, role) not in tower_configs:
        raise ValueError(f'config.model.fusion.{role} = {getattr(fusion, role)!r}: no such tower '
                         f'in config.model.towers (it has {sorted(tower_configs)}).')
    for name, opts in head_options.items():
      fused = set(heads_lib.modalities(name, opts).values())
      if name in heads_lib.FUSED and {fusion.query, fusion.context} - fused:
        raise ValueError(f'config.model.heads.{name} fuses {sorted(fused)}, but cross-attention '
                         f'fusion needs its query {fusion.query!r} and context '
                         f'{fusion.context!r} among them (config.model.fusion).')
  heads = {name: heads_lib.build(name, opts, context, fusion)
           for name, opts in head_options.items()}
  for key in ('temperature_init', 'temperature_max'):
    if model_config[key] <= 0:
      raise ValueError(f'config.model.{key}={model_config[key]} must be positive')
  return MultimodalModel(
      towers=towers, heads=heads, fusion=fusion,
      temperature_init=model_config['temperature_init'],
      temperature_max=model_config['temperature_max'], bias_init=model_config['bias_init'],
      param_dtype=context.param_dtype)

