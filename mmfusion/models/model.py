"""MultimodalModel: one tower per modality present in the batch, the contrastive temperature and
bias, and an optional classification head; `build` makes it from `config.model`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers
from mmfusion.models import text as text_lib
from mmfusion.models import vit

Array = jax.Array
Dtype = Any

MODALITIES = ('image', 'text')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  # Flooring the squared norm keeps a zero vector, and its gradient, free of NaN.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class MultimodalModel(nn.Module):
  """Towers by modality, logit scale/bias and an optional classification head.

  `__call__(batch, train=False)` runs only the towers whose input is in the batch
  ('image' [B,H,W,3]; 'text' [B,L] int with 'text_mask' [B,L] bool) and returns:
    embeddings[m] [B,D] float32, L2-normalised     tokens[m] [B,N,W]    pooled[m] [B,W]
    logit_scale   scalar float32 = min(exp(logit_scale), temperature_max)
    logit_bias    scalar float32 (SigLIP's sigmoid loss uses it; CLIP ignores it)
    logits        [B,num_classes] float32, only with a head and its input modality present.
  tokens and pooled stay in the compute dtype. Top-level params: image, text, logit_scale,
  logit_bias, head (num_classes > 0 only); fine-tuning loads and freezes by these names.
  """
  image: vit.ViT | None = None
  text: text_lib.TextEncoder | None = None
  temperature_init: float = 1 / 0.07
  temperature_max: float = 100.0
  bias_init: float = 0.0
  num_classes: int = 0
  head_input: str = 'image'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.num_classes > 0 and self.head_input not in MODALITIES:
      raise ValueError(f'head input {self.head_input!r}; expected one of {MODALITIES}')
    if self.temperature_init <= 0 or self.temperature_max <= 0:
      raise ValueError(f'temperature_init={self.temperature_init} and temperature_max='
                       f'{self.temperature_max} must be positive')
    super().__post_init__()

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {'embeddings': {}, 'tokens': {}, 'pooled': {}}
    for name in MODALITIES:
      if name not in batch:
        continue
      tower = getattr(self, name)
      if tower is None:
        raise ValueError(f'batch has {name!r} but the model has no {name} tower')
      if name == 'text':
        if 'text_mask' not in batch:
          raise ValueError("batch has 'text' but no 'text_mask' (bool [B,L], True = real token)")
        tokens, pooled, embedding = tower(batch['text'], batch['text_mask'], train=train)
      else:
        tokens, pooled, embedding = tower(batch[name], train=train)
      out['tokens'][name] = tokens
      out['pooled'][name] = pooled
      out['embeddings'][name] = l2_normalize(embedding.astype(jnp.float32))

    # exp then clamp (CLIP): once exp(p) > temperature_max the gradient w.r.t. p is zero,
    # so the temperature stops growing.
    scale_init = nn.initializers.constant(math.log(self.temperature_init))
    log_scale = self.param('logit_scale', layers.named_init(scale_init, ()), (), self.param_dtype)
    out['logit_scale'] = jnp.minimum(jnp.exp(log_scale.astype(jnp.float32)), self.temperature_max)
    bias = self.param('logit_bias', layers.named_init(nn.initializers.constant(self.bias_init), ()),
                      (), self.param_dtype)
    out['logit_bias'] = bias.astype(jnp.float32)

    if self.num_classes > 0 and self.head_input in out['pooled']:
      # Zero-init: a fresh fine-tuning head starts from uniform predictions.
      logits = nn.Dense(
          self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=layers.named_init(nn.initializers.zeros, ('embed', 'classes')),
          bias_init=layers.named_init(nn.initializers.zeros, ('classes',)), name='head')(
              out['pooled'][self.head_input])
      out['logits'] = logits.astype(jnp.float32)
    return out


def _dtype(name: str, key: str) -> Dtype:
  if name not in DTYPES:
    raise ValueError(f'config.model.{key}={name!r}; expected one of {sorted(DTYPES)}')
  return DTYPES[name]


def build(model_config: Mapping[str, Any], vocab_size: int, *,
          attention_impl: str | None = None, sow_attention: bool = False) -> MultimodalModel:
  """MultimodalModel from `config.model` (see mmfusion/config.py) and the tokenizer's vocab size.

  A non-empty tower `variant` ('B/16', 'S', ...) overrides that tower's explicit sizes.
  Compute options come from the config too: `attention` ('auto' | 'xla' | 'cudnn' |
  'explicit'), `remat` / `remat_save` (see layers.remat_policy) and `scan_layers`.
  attention_impl overrides `config.model.attention`; `sow_attention` records attention weights
  into 'intermediates', which needs (and then defaults to) the 'explicit' implementation.
  Bad values raise ValueError naming the config key, before any compute.
  """
  dtype = _dtype(model_config['dtype'], 'dtype')
  param_dtype = _dtype(model_config['param_dtype'], 'param_dtype')
  if attention_impl is None:
    attention_impl = 'explicit' if sow_attention else model_config['attention']
  if attention_impl != 'auto' and attention_impl not in layers.ATTENTION_IMPLS:
    raise ValueError(f'config.model.attention={attention_impl!r}; expected auto or one of '
                     f'{layers.ATTENTION_IMPLS}')
  try:
    layers.remat_policy(model_config['remat'], tuple(model_config['remat_save']))
  except ValueError as e:
    raise ValueError(f'config.model.{e}') from e
  common = dict(embed_dim=model_config['embed_dim'], sow_weights=sow_attention,
                remat=model_config['remat'], remat_save=tuple(model_config['remat_save']),
                scan_layers=model_config['scan_layers'], dtype=dtype, param_dtype=param_dtype)

  def tower(key: str, make):
    cfg = model_config[key]
    try:
      sizes = dict(width=cfg['width'], depth=cfg['depth'], mlp_dim=cfg['mlp_dim'],
                   num_heads=cfg['num_heads'])
      sizes.update(vit.decode_variant(cfg['variant']))
      return make(cfg, sizes)
    except ValueError as e:
      raise ValueError(f'config.model.{key}: {e}') from e

  def make_image(cfg, sizes):
    sizes.setdefault('patch_size', cfg['patch_size'])
    impl = layers.resolve_attention_impl(attention_impl, dtype, sizes['width'] // sizes['num_heads'])
    return vit.ViT(pool=cfg['pool'], dropout=cfg['dropout'], attention_impl=impl, **sizes, **common)

  def make_text(cfg, sizes):
    if 'patch_size' in sizes:
      raise ValueError(f"variant={cfg['variant']!r}: a text variant takes no '/<patch size>'")
    impl = layers.resolve_attention_impl(attention_impl, dtype, sizes['width'] // sizes['num_heads'])
    return text_lib.TextEncoder(vocab_size=vocab_size, causal=cfg['causal'], pool=cfg['pool'],
                                dropout=cfg['dropout'], attention_impl=impl, **sizes, **common)

  head = model_config['head']
  if head['num_classes'] > 0 and head['input'] not in MODALITIES:
    raise ValueError(f"config.model.head.input={head['input']!r}; expected one of {MODALITIES}")
  for key in ('temperature_init', 'temperature_max'):
    if model_config[key] <= 0:
      raise ValueError(f'config.model.{key}={model_config[key]} must be positive')
  return MultimodalModel(
      image=tower('image', make_image), text=tower('text', make_text),
      temperature_init=model_config['temperature_init'],
      temperature_max=model_config['temperature_max'], bias_init=model_config['bias_init'],
      num_classes=head['num_classes'], head_input=head['input'],
      dtype=dtype, param_dtype=param_dtype)
