"""MultimodalModel: one tower per modality present in the batch, the contrastive temperature and
bias, an optional classification head, and the fused tasks (a fusion module with ITM, MLM and
VQA heads, and a captioning decoder); `build` makes it from `config.model`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import decoder as decoder_lib
from mmfusion.models import fusion as fusion_lib
from mmfusion.models import layers
from mmfusion.models import sampling
from mmfusion.models import text as text_lib
from mmfusion.models import vit

Array = jax.Array
Dtype = Any

MODALITIES = ('image', 'text')
BOS_ID = 2     # the tokenizer's ids (mmfusion/data/tokenizer.py): pad 0, unk 1, bos 2, eos 3
# Random streams the forward pass draws from in training: dropout, the ITM hard negatives, the
# MLM masks. The trainer folds one key per stream from the step's key.
RNG_STREAMS = ('dropout', 'sample', 'mask')
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
  With a `fusion` module and both modalities in the batch, the fused tasks (each only when its
  head exists):
    itm      {'logits' [N,2], 'labels' [N]}: image-text match on the positive pairs; in training
             also on one hard negative text per image and one hard negative image per text,
             sampled from the contrastive similarities (never the positive), N = 3B.
    mlm      {'logits' [B,L,V], 'targets' [B,L], 'weights' [B,L]}: the text, 15% of its tokens
             masked in training (80/10/10), fused with the image; weights mark the masked ones.
    vqa      {'logits' [B,A]}: 'question' [B,L] / 'question_mask' fused with the image, over the
             answer vocabulary.
  With a caption decoder: caption {'logits' [B,L,V], 'targets' [B,L], 'weights' [B,L]}, the
  text teacher-forced (BOS + text[:-1]) while cross-attending to the image tokens.
  tokens and pooled stay in the compute dtype. Top-level params: image, text, logit_scale,
  logit_bias, head (num_classes > 0 only), fusion, itm_head, vqa_head, mlm_head,
  caption_decoder (each only when configured); fine-tuning loads and freezes by these names.
  """
  image: vit.ViT | None = None
  text: text_lib.TextEncoder | None = None
  temperature_init: float = 1 / 0.07
  temperature_max: float = 100.0
  bias_init: float = 0.0
  num_classes: int = 0
  head_input: str = 'image'
  fusion: fusion_lib.Fusion | None = None
  itm_head: fusion_lib.FusionHead | None = None
  vqa_head: fusion_lib.FusionHead | None = None
  mlm_head: nn.Module | None = None   # Dense to the tokenizer's vocab over fused text tokens
  mask_id: int = 0                    # MLM's [MASK]: one id past the tokenizer's vocab
  caption_decoder: decoder_lib.TextDecoder | None = None
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

    if 'image' in out['tokens'] and ('text' in batch or 'question' in batch):
      self._fused_tasks(batch, out, train)
    return out

  # -- fused tasks ----------------------------------------------------------------------------

  def _image_mask(self, tokens_bnw: Array) -> Array:
    return jnp.ones(tokens_bnw.shape[:2], jnp.bool_)

  def fuse(self, image_tokens, image_pooled, text_tokens, text_pooled, text_mask, *,
           train: bool = False) -> dict[str, Any]:
    """The fusion module on (image, text) tower outputs: see fusion.Fusion for the keys."""
    return self.fusion(
        {'image': image_tokens, 'text': text_tokens},
        {'image': self._image_mask(image_tokens), 'text': text_mask.astype(jnp.bool_)},
        {'image': image_pooled, 'text': text_pooled}, train=train)

  def match_logits(self, image_tokens, image_pooled, text_tokens, text_pooled, text_mask):
    """ITM logits [B, 2] (no match, match) of aligned (image, text) tower outputs: what the
    retrieval evaluator re-ranks with."""
    fused = self.fuse(image_tokens, image_pooled, text_tokens, text_pooled, text_mask)
    return self.itm_head(fused).astype(jnp.float32)

  def answer_logits(self, image_tokens, image_pooled, question_tokens, question_pooled,
                    question_mask):
    """VQA logits [B, A] of aligned (image, question) tower outputs (the VQA evaluator's)."""
    fused = self.fuse(image_tokens, image_pooled, question_tokens, question_pooled,
                      question_mask)
    return self.vqa_head(fused).astype(jnp.float32)

  def _fused_tasks(self, batch, out, train: bool) -> None:
    image_tokens, image_pooled = out['tokens']['image'], out['pooled']['image']
    has_text = 'text' in out['tokens']
    if self.fusion is not None and self.itm_head is not None and has_text:
      out['itm'] = self._itm(out, batch['text_mask'], train)
    if self.fusion is not None and self.mlm_head is not None and has_text:
      out['mlm'] = self._mlm(batch, image_tokens, image_pooled, train)
    if self.fusion is not None and self.vqa_head is not None and 'question' in batch:
      if 'question_mask' not in batch:
        raise ValueError("batch has 'question' but no 'question_mask'")
      q_tokens, q_pooled, _ = self.text(batch['question'], batch['question_mask'], train=train)
      fused = self.fuse(image_tokens, image_pooled, q_tokens, q_pooled, batch['question_mask'],
                        train=train)
      out['vqa'] = {'logits': self.vqa_head(fused).astype(jnp.float32)}
    if self.caption_decoder is not None and has_text:
      text_bl = batch['text']
      inputs_bl = jnp.concatenate(
          [jnp.full((text_bl.shape[0], 1), BOS_ID, text_bl.dtype), text_bl[:, :-1]], axis=1)
      logits = self.caption_decoder(inputs_bl, image_tokens, self._image_mask(image_tokens),
                                    train=train)
      out['caption'] = {'logits': logits, 'targets': text_bl,
                        'weights': batch['text_mask'].astype(jnp.float32)}

  def _itm(self, out, text_mask, train: bool) -> dict[str, Array]:
    """Positive pairs, and in training ALBEF's in-batch hard negatives: for each image a text
    and for each text an image, drawn in proportion to softmax(similarity) over the others."""
    image_tokens, image_pooled = out['tokens']['image'], out['pooled']['image']
    text_tokens, text_pooled = out['tokens']['text'], out['pooled']['text']
    batch = image_tokens.shape[0]
    if train:
      # At the contrastive temperature, as ALBEF: raw cosines in [-1, 1] would make the
      # softmax nearly uniform, and the negatives no harder than random ones.
      sim_bb = out['logit_scale'] * out['embeddings']['image'] @ out['embeddings']['text'].T
      text_for_image, image_for_text = sampling.negatives_for_both(self.make_rng('sample'), sim_bb)
      both = lambda pos, idx_a, idx_b: jnp.concatenate([pos, pos[idx_a], pos[idx_b]])
      keep = jnp.arange(batch)
      image_tokens = both(image_tokens, keep, image_for_text)
      image_pooled = both(image_pooled, keep, image_for_text)
      text_tokens = both(text_tokens, text_for_image, keep)
      text_pooled = both(text_pooled, text_for_image, keep)
      text_mask = both(text_mask, text_for_image, keep)
    fused = self.fuse(image_tokens, image_pooled, text_tokens, text_pooled, text_mask,
                      train=train)
    labels = (jnp.arange(image_tokens.shape[0]) < batch).astype(jnp.int32)
    return {'logits': self.itm_head(fused).astype(jnp.float32), 'labels': labels}

  def _mlm(self, batch, image_tokens, image_pooled, train: bool) -> dict[str, Array]:
    text_bl, mask_bl = batch['text'], batch['text_mask']
    if train:
      inputs_bl, targets_bl, weights_bl = sampling.mask_tokens(
          self.make_rng('mask'), text_bl, mask_bl, mask_id=self.mask_id, vocab_size=self.mask_id)
    else:   # evaluation: nothing masked, nothing scored
      inputs_bl, targets_bl, weights_bl = text_bl, text_bl, jnp.zeros(text_bl.shape, jnp.float32)
    tokens, pooled, _ = self.text(inputs_bl, mask_bl, train=train)
    fused = self.fuse(image_tokens, image_pooled, tokens, pooled, mask_bl, train=train)
    if 'text' not in fused['tokens_by_modality']:
      raise ValueError(f'MLM predicts text tokens, but fusion strategy '
                       f'{self.fusion.strategy!r} gives no per-token text outputs.')
    logits_blv = self.mlm_head(fused['tokens_by_modality']['text'])
    return {'logits': logits_blv.astype(jnp.float32), 'targets': targets_bl,
            'weights': weights_bl}


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
    return text_lib.TextEncoder(vocab_size=text_vocab, causal=cfg['causal'], pool=cfg['pool'],
                                dropout=cfg['dropout'], attention_impl=impl, **sizes, **common)

  fused = _fused_parts(model_config, vocab_size, attention_impl, sow_attention, dtype, param_dtype)
  text_vocab = vocab_size + (1 if fused['mlm_head'] is not None else 0)   # + [MASK]

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
      num_classes=head['num_classes'], head_input=head['input'], **fused,
      dtype=dtype, param_dtype=param_dtype)


def _fused_parts(model_config, vocab_size: int, attention_impl: str, sow_attention: bool,
                 dtype: Dtype, param_dtype: Dtype) -> dict[str, Any]:
  """The fusion module, its heads and the caption decoder that `config.model` asks for."""
  cfg, heads, dec = model_config['fusion'], model_config['heads'], model_config['decoder']
  parts = dict(fusion=None, itm_head=None, vqa_head=None, mlm_head=None, mask_id=0,
               caption_decoder=None)
  wants_fusion = heads['itm'] or heads['mlm'] or heads['vqa_answers']
  if wants_fusion and not cfg['strategy']:
    raise ValueError('config.model.heads asks for ITM, MLM or VQA, which run on fused '
                     'image-text features, but config.model.fusion.strategy is empty; set it '
                     f'to one of {fusion_lib.STRATEGIES}.')
  if cfg['strategy']:
    impl = layers.resolve_attention_impl(attention_impl, dtype, cfg['width'] // cfg['num_heads'])
    try:
      parts['fusion'] = fusion_lib.Fusion(
          strategy=cfg['strategy'], width=cfg['width'], depth=cfg['depth'],
          num_heads=cfg['num_heads'], mlp_dim=cfg['mlp_dim'], query=cfg['query'],
          context=cfg['context'], start_layer=cfg['start_layer'],
          num_bottleneck=cfg['num_bottleneck'], gate=cfg['gate'], dropout=cfg['dropout'],
          attention_impl='explicit' if sow_attention else impl, sow_weights=sow_attention,
          remat=model_config['remat'], dtype=dtype, param_dtype=param_dtype)
    except ValueError as e:
      raise ValueError(f'config.model.fusion: {e}') from e
    head = lambda n: fusion_lib.FusionHead(n, strategy=cfg['strategy'],
                                           combine=heads['late_combine'], dtype=dtype,
                                           param_dtype=param_dtype)
    if heads['itm']:
      parts['itm_head'] = head(2)
    if heads['vqa_answers']:
      if heads['vqa_answers'] < 0:
        raise ValueError(f"config.model.heads.vqa_answers={heads['vqa_answers']}: the trainer "
                         "resolves -1 to the dataset's answer vocabulary; build with a size.")
      parts['vqa_head'] = head(heads['vqa_answers'])
    if heads['mlm']:
      parts['mlm_head'] = nn.Dense(
          vocab_size, dtype=dtype, param_dtype=param_dtype,
          kernel_init=layers.named_init(nn.initializers.xavier_uniform(), ('embed', 'vocab')),
          bias_init=layers.named_init(nn.initializers.zeros, ('vocab',)))
      parts['mask_id'] = vocab_size
  if dec['depth']:
    parts['caption_decoder'] = decoder_lib.TextDecoder(
        vocab_size=vocab_size, width=dec['width'], depth=dec['depth'], mlp_dim=dec['mlp_dim'],
        num_heads=dec['num_heads'], max_len=model_config['decoder']['max_len'],
        dropout=dec['dropout'], dtype=dtype, param_dtype=param_dtype)
  return parts
