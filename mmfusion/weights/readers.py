"""Readers of public CLIP / SigLIP checkpoints: each turns one format's tensors into an `Imported`
(mmfusion's towers config, params in its layout, logit scale / bias, image preprocessing and
tokenizer conventions), taking every tensor it maps and naming any it cannot.

  openai      OpenAI CLIP and open_clip state dicts (.pt / .pth / .bin / .safetensors): ViTs
              with a class token and ln_pre, packed in_proj_weight, x @ proj, the text pooled
              at its end-of-text token; QuickGELU for OpenAI's weights, GELU for open_clip's own.
  hf          Hugging Face CLIPModel / SiglipModel directories (config.json + model.safetensors).
  big_vision  big_vision SigLIP .npz (a flat '/'-joined Flax tree; scanned or unrolled layers).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import numpy as np

from mmfusion.weights import layout
from mmfusion.weights.tensors import Tensors, WeightsError, read

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
# Hugging Face's hidden_act names -> mmfusion's (models/layers.py ACTIVATIONS).
HF_ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu_erf',
                  'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh'}
KEY_BIAS_NOTE = ('attention key biases dropped: softmax cancels them exactly (mmfusion has none)')


@dataclasses.dataclass
class Imported:
  """A checkpoint in mmfusion's terms; `config` of mmfusion/import_weights.py makes a run's config
  of it."""
  source: str
  towers: dict[str, dict[str, Any]]       # config.model.towers
  embed_dim: int
  params: dict[str, Any]                  # mmfusion's param tree (numpy float32)
  objective: str                          # 'softmax_contrastive' | 'sigmoid_contrastive'
  image_size: int
  image_mean: tuple[float, ...]
  image_std: tuple[float, ...]
  max_len: int                            # the text tower's context length
  pad_id: int = -1                        # -1: the tokenizer's own
  attend_padding: bool = False
  tokenizer: str = ''                     # a tokenizer file that came with the weights
  notes: list[str] = dataclasses.field(default_factory=list)


def _vit_options(width, depth, mlp_dim, heads, patch, pool, activation, eps, pre_norm=False):
  return dict(type='vit', variant='', patch_size=patch, width=width, depth=depth,
              mlp_dim=mlp_dim, num_heads=heads, pool=pool, dropout=0.0, pre_norm=pre_norm,
              activation=activation, norm_eps=eps)


def _text_options(width, depth, mlp_dim, heads, causal, pool, activation, eps):
  return dict(type='text', variant='', width=width, depth=depth, mlp_dim=mlp_dim,
              num_heads=heads, causal=causal, pool=pool, dropout=0.0, activation=activation,
              norm_eps=eps)


def _scale_and_bias(t: Tensors, scale: str, bias: str | None) -> dict[str, np.ndarray]:
  out = {'logit_scale': t.take(scale).reshape(())}
  out['logit_bias'] = (t.take(bias).reshape(()) if bias else np.zeros((), np.float32))
  return out


def _resampled(pos_nw: np.ndarray, patch: int, image_size: int | None, notes: list[str]
               ) -> tuple[np.ndarray, int]:
  """The patch position table for `image_size` (None: the checkpoint's own) and that size."""
  side = layout.grid_size(pos_nw.shape[0], 'image position embedding')
  if image_size is None:
    return pos_nw, side * patch
  if image_size % patch:
    raise WeightsError(f'--image_size {image_size} is not a multiple of the patch size {patch}')
  if image_size // patch != side:
    notes.append(f'image position embeddings resampled from {side}x{side} to '
                 f'{image_size // patch}x{image_size // patch} patches (bilinear)')
  return layout.resample_posemb(pos_nw, image_size // patch), image_size


# ------------------------------------------------------------------- OpenAI CLIP / open_clip

def _torch_block(t: Tensors, prefix: str, heads: int, packed: bool) -> dict[str, Any]:
  """One residual block of OpenAI / open_clip (packed) or Hugging Face (separate q/k/v)."""
  lin = lambda name: (t.take(f'{prefix}{name}.weight'),
                      t.take(f'{prefix}{name}.bias') if f'{prefix}{name}.bias' in t else None)
  ln = lambda name: layout.norm(t.take(f'{prefix}{name}.weight'), t.take(f'{prefix}{name}.bias'))
  if packed:
    attn = layout.packed_attention((t.take(f'{prefix}attn.in_proj_weight'),
                                    t.take(f'{prefix}attn.in_proj_bias')),
                                   lin('attn.out_proj'), heads)
    return layout.block(ln('ln_1'), attn, ln('ln_2'), lin('mlp.c_fc'), lin('mlp.c_proj'))
  attn = layout.attention(lin('self_attn.q_proj'), lin('self_attn.k_proj'),
                          lin('self_attn.v_proj'), lin('self_attn.out_proj'), heads)
  return layout.block(ln('layer_norm1'), attn, ln('layer_norm2'), lin('mlp.fc1'), lin('mlp.fc2'))


def _heads(given: int, width: int, tower: str) -> int:
  """OpenAI's rule, heads = width / 64, unless given."""
  heads = given or width // 64
  if heads < 1 or width % heads:
    raise WeightsError(f'the {tower} tower is {width} wide: {heads} heads do not divide it; give '
                       f'--{tower}_heads.')
  return heads


def openai(path: str, *, activation: str = 'quick_gelu', image_heads: int = 0,
           text_heads: int = 0, image_size: int | None = None) -> Imported:
  """OpenAI CLIP (QuickGELU) or open_clip (pass its activation) ViT state dicts. Head counts
  are not in the tensors: OpenAI's rule is width / 64, which `*_heads` override."""
  t = Tensors(read(path), path)
  t.skip(['attn_mask', 'input_resolution', 'context_length', 'vocab_size'])
  if 'visual.conv1.weight' not in t:
    raise WeightsError(f'{path}: no visual.conv1.weight; only ViT CLIP models import (not the '
                       'ResNet ones), from a state dict with OpenAI / open_clip names.')
  notes = [KEY_BIAS_NOTE]
  conv = t.take('visual.conv1.weight')                           # [W, 3, P, P]
  width, patch = conv.shape[0], conv.shape[-1]
  pos = t.take('visual.positional_embedding')                    # [1 + N, W]
  patches, image_size = _resampled(pos[1:], patch, image_size, notes)
  v_heads = _heads(image_heads, width, 'image')
  v_depth = t.count('visual.transformer.resblocks.{}.')
  ln = lambda name: layout.norm(t.take(f'{name}.weight'), t.take(f'{name}.bias'))
  image = {
      'embedding': {'kernel': layout.patch_kernel(conv), 'bias': np.zeros(width, np.float32)},
      'cls': (t.take('visual.class_embedding') + pos[0])[None, None],
      'pos_embedding': patches,
      'pre_norm': ln('visual.ln_pre'),
      'encoder': layout.encoder(
          [_torch_block(t, f'visual.transformer.resblocks.{i}.', v_heads, packed=True)
           for i in range(v_depth)], ln('visual.ln_post')),
  }
  proj = t.take('visual.proj')                                    # [W, D], used as x @ proj
  image['proj'] = {'kernel': proj, 'bias': np.zeros(proj.shape[1], np.float32)}
  v_mlp = image['encoder']['block_0']['mlp']['fc1']['kernel'].shape[1]

  tok = t.take('token_embedding.weight')
  t_width = tok.shape[1]
  t_heads = _heads(text_heads, t_width, 'text')
  t_depth = t.count('transformer.resblocks.{}.')
  t_pos = t.take('positional_embedding')
  t_proj = t.take('text_projection')
  text = {
      'token_embedding': {'embedding': tok}, 'pos_embedding': t_pos,
      'encoder': layout.encoder(
          [_torch_block(t, f'transformer.resblocks.{i}.', t_heads, packed=True)
           for i in range(t_depth)], ln('ln_final')),
      'proj': {'kernel': t_proj, 'bias': np.zeros(t_proj.shape[1], np.float32)},
  }
  t_mlp = text['encoder']['block_0']['mlp']['fc1']['kernel'].shape[1]
  params = {'image': image, 'text': text,
            **_scale_and_bias(t, 'logit_scale', 'logit_bias' if 'logit_bias' in t else None)}
  t.check_all_taken()
  towers = {
      'image': _vit_options(width, v_depth, v_mlp, v_heads, patch, 'cls', activation, 1e-5,
                            pre_norm=True),
      'text': _text_options(t_width, t_depth, t_mlp, t_heads, True, 'eos', activation, 1e-5)}
  return Imported('openai', towers, proj.shape[1], params, 'softmax_contrastive', image_size,
                  OPENAI_MEAN, OPENAI_STD, max_len=t_pos.shape[0], notes=notes)


# --------------------------------------------------------------------------- Hugging Face

def _hf_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, 'config.json')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f'a Hugging Face model directory needs config.json: {path} ({e})') from None


def _hf_activation(config: dict[str, Any], where: str) -> str:
  act = config.get('hidden_act', 'quick_gelu')
  if act not in HF_ACTIVATIONS:
    raise WeightsError(f'{where}.hidden_act = {act!r}: mmfusion has {sorted(HF_ACTIVATIONS)}')
  return HF_ACTIVATIONS[act]


def _hf_weights(directory: str) -> Tensors:
  path = os.path.join(directory, 'model.safetensors')
  if not os.path.exists(path):
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    raise WeightsError(f'{directory} has no model.safetensors (it has {found}); save the model '
                       'with safe_serialization=True.')
  t = Tensors(read(path), path)
  t.skip([k for k in t.arrays if k.endswith('position_ids')])
  return t


def _hf_tower(t: Tensors, prefix: str, cfg: dict[str, Any]) -> tuple[list, int]:
  heads = cfg['num_attention_heads']
  depth = t.count(prefix + 'encoder.layers.{}.')
  if depth != cfg['num_hidden_layers']:
    raise WeightsError(f'{t.origin}: {depth} layers under {prefix}encoder, config.json says '
                       f"{cfg['num_hidden_layers']}")
  return [_torch_block(t, f'{prefix}encoder.layers.{i}.', heads, packed=False)
          for i in range(depth)], heads


def hf(directory: str, *, image_size: int | None = None) -> Imported:
  """A Hugging Face CLIPModel or SiglipModel saved with save_pretrained (safetensors)."""
  config = _hf_config(directory)
  kind = config.get('model_type')
  if kind not in ('clip', 'siglip'):
    raise WeightsError(f'{directory}: model_type {kind!r}; mmfusion imports clip and siglip.')
  t = _hf_weights(directory)
  vc, tc = config['vision_config'], config['text_config']
  notes = [KEY_BIAS_NOTE]
  ln = lambda name: layout.norm(t.take(f'{name}.weight'), t.take(f'{name}.bias'))
  v, ve = 'vision_model.', 'vision_model.embeddings.'
  conv = t.take(ve + 'patch_embedding.weight')
  width, patch = conv.shape[0], conv.shape[-1]
  pos = t.take(ve + 'position_embedding.weight')
  v_blocks, v_heads = _hf_tower(t, v, vc)
  image = {'embedding': {'kernel': layout.patch_kernel(conv),
                         'bias': t.take(ve + 'patch_embedding.bias')
                         if ve + 'patch_embedding.bias' in t else np.zeros(width, np.float32)}}
  tx, te = 'text_model.', 'text_model.embeddings.'
  text = {'token_embedding': {'embedding': t.take(te + 'token_embedding.weight')},
          'pos_embedding': t.take(te + 'position_embedding.weight')}
  t_blocks, t_heads = _hf_tower(t, tx, tc)
  text['encoder'] = layout.encoder(t_blocks, ln(tx + 'final_layer_norm'))
  v_act, t_act = _hf_activation(vc, 'vision_config'), _hf_activation(tc, 'text_config')
  v_eps, t_eps = vc.get('layer_norm_eps', 1e-5), tc.get('layer_norm_eps', 1e-5)

  if kind == 'clip':
    patches, image_size = _resampled(pos[1:], patch, image_size, notes)
    image['cls'] = (t.take(ve + 'class_embedding') + pos[0])[None, None]
    image['pos_embedding'] = patches
    image['pre_norm'] = ln(v + 'pre_layrnorm')
    image['encoder'] = layout.encoder(v_blocks, ln(v + 'post_layernorm'))
    image['proj'] = layout.dense((t.take('visual_projection.weight'), None))
    text['proj'] = layout.dense((t.take('text_projection.weight'), None))
    embed_dim = image['proj']['kernel'].shape[1]
    pool, pre_norm, causal, t_pool = 'cls', True, True, 'eos'
    objective, mean, std, pad_id, attend_padding = (
        'softmax_contrastive', OPENAI_MEAN, OPENAI_STD, -1, False)
    scale = _scale_and_bias(t, 'logit_scale', None)
  else:   # siglip: MAP head, no image projection, text pooled at the last position
    patches, image_size = _resampled(pos, patch, image_size, notes)
    image['pos_embedding'] = patches
    image['encoder'] = layout.encoder(v_blocks, ln(v + 'post_layernorm'))
    h = v + 'head.'
    image['map_head'] = {
        'probe': t.take(h + 'probe'),
        'attn': layout.packed_attention((t.take(h + 'attention.in_proj_weight'),
                                         t.take(h + 'attention.in_proj_bias')),
                                        (t.take(h + 'attention.out_proj.weight'),
                                         t.take(h + 'attention.out_proj.bias')), v_heads),
        'ln': ln(h + 'layernorm'),
        'mlp': {'fc1': layout.dense((t.take(h + 'mlp.fc1.weight'), t.take(h + 'mlp.fc1.bias'))),
                'fc2': layout.dense((t.take(h + 'mlp.fc2.weight'), t.take(h + 'mlp.fc2.bias')))}}
    # SigLIP's image embedding is the pooled vector itself: an identity projection (exact).
    image['proj'] = {'kernel': np.eye(width, dtype=np.float32),
                     'bias': np.zeros(width, np.float32)}
    text['proj'] = layout.dense((t.take(tx + 'head.weight'), t.take(tx + 'head.bias')))
    embed_dim = width
    if text['proj']['kernel'].shape[1] != width:
      raise WeightsError(f'{directory}: the text head maps to {text["proj"]["kernel"].shape[1]}, '
                         f'the image embedding has {width}')
    pool, pre_norm, causal, t_pool = 'map', False, False, 'last'
    objective, mean, std = 'sigmoid_contrastive', HALF, HALF
    pad_id, attend_padding = tc.get('pad_token_id', 1), True
    scale = _scale_and_bias(t, 'logit_scale', 'logit_bias')
    notes.append('SigLIP text: padded with id {} to {} tokens, all attended, pooled at the last '
                 'position (as trained)'.format(pad_id, text['pos_embedding'].shape[0]))
  params = {'image': image, 'text': text, **scale}
  t.check_all_taken()
  mlp = lambda enc: enc['block_0']['mlp']['fc1']['kernel'].shape[1]
  towers = {
      'image': _vit_options(width, len(v_blocks), mlp(image['encoder']), v_heads, patch, pool,
                            v_act, v_eps, pre_norm=pre_norm),
      'text': _text_options(text['token_embedding']['embedding'].shape[1], len(t_blocks),
                            mlp(text['encoder']), t_heads, causal, t_pool, t_act, t_eps)}
  preprocessor = os.path.join(directory, 'preprocessor_config.json')
  if os.path.exists(preprocessor):
    with open(preprocessor) as f:
      pre = json.load(f)
    mean, std = tuple(pre.get('image_mean', mean)), tuple(pre.get('image_std', std))
  tokenizer = next((os.path.join(directory, name) for name in ('tokenizer.json', 'spiece.model')
                    if os.path.exists(os.path.join(directory, name))), '')
  return Imported(f'hf_{kind}', towers, embed_dim, params, objective, image_size, mean, std,
                  max_len=text['pos_embedding'].shape[0], pad_id=pad_id,
                  attend_padding=attend_padding, tokenizer=tokenizer, notes=notes)


# ----------------------------------------------------------------------- big_vision SigLIP

def _flax_attention(get: Callable[[str], np.ndarray], prefix: str) -> dict[str, Any]:
  """A Flax MultiHeadDotProductAttention (kernels already [W, H, D] / [H, D, W])."""
  node = lambda name: {'kernel': get(f'{prefix}{name}/kernel'), 'bias': get(f'{prefix}{name}/bias')}
  attn = {'query': node('query'), 'key': node('key'), 'value': node('value'), 'out': node('out')}
  del attn['key']['bias']          # dropped exactly (module docstring of layout.py)
  return attn


def _flax_mlp(get: Callable[[str], np.ndarray], prefix: str) -> dict[str, Any]:
  return {name: {'kernel': get(f'{prefix}{dense}/kernel'), 'bias': get(f'{prefix}{dense}/bias')}
          for name, dense in (('fc1', 'Dense_0'), ('fc2', 'Dense_1'))}


def _flax_norm(get: Callable[[str], np.ndarray], prefix: str) -> dict[str, Any]:
  return layout.norm(get(f'{prefix}/scale'), get(f'{prefix}/bias'))


def _flax_block(get: Callable[[str], np.ndarray], prefix: str) -> dict[str, Any]:
  """One big_vision Encoder1DBlock: LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0 (Dense_0, Dense_1)."""
  return {'ln_attn': _flax_norm(get, prefix + 'LayerNorm_0'),
          'attn': _flax_attention(get, prefix + 'MultiHeadDotProductAttention_0/'),
          'ln_mlp': _flax_norm(get, prefix + 'LayerNorm_1'),
          'mlp': _flax_mlp(get, prefix + 'MlpBlock_0/')}


def _flax_encoder(t: Tensors, prefix: str) -> list[dict[str, Any]]:
  """The blocks under `prefix` ('.../Transformer/'), unrolled (encoderblock_i) or scanned
  (one encoderblock whose arrays have a leading layer axis)."""
  depth = t.count(prefix + 'encoderblock_{}/')
  if depth:
    return [_flax_block(t.take, f'{prefix}encoderblock_{i}/') for i in range(depth)]
  scanned = [k for k in t.arrays if k.startswith(prefix + 'encoderblock/')]
  if not scanned:
    raise WeightsError(f'{t.origin}: no encoder blocks under {prefix}')
  cache: dict[str, np.ndarray] = {}
  stacked = lambda name: cache.setdefault(name, t.take(name))
  depth = stacked(scanned[0]).shape[0]
  return [_flax_block(lambda name, i=i: stacked(name)[i], f'{prefix}encoderblock/')
          for i in range(depth)]


def big_vision(path: str, *, image_size: int | None = None) -> Imported:
  """A big_vision SigLIP checkpoint (.npz of 'params/img/...', 'params/txt/...', t, b)."""
  arrays = read(path)
  arrays = {k[len('params/'):] if k.startswith('params/') else k: v for k, v in arrays.items()}
  t = Tensors(arrays, path)
  if 'img/embedding/kernel' not in t or 'txt/Embed_0/embedding' not in t:
    raise WeightsError(f'{path}: not a big_vision two-tower checkpoint (no img/embedding or '
                       'txt/Embed_0 arrays).')
  notes = [KEY_BIAS_NOTE]
  ln = lambda name: _flax_norm(t.take, name)
  kernel = t.take('img/embedding/kernel')                       # [P, P, 3, W]
  patch, width = kernel.shape[0], kernel.shape[-1]
  patches, image_size = _resampled(t.take('img/pos_embedding')[0], patch, image_size, notes)
  v_blocks = _flax_encoder(t, 'img/Transformer/')
  heads = v_blocks[0]['attn']['query']['kernel'].shape[1]
  image = {'embedding': {'kernel': kernel, 'bias': t.take('img/embedding/bias')},
           'pos_embedding': patches,
           'encoder': layout.encoder(v_blocks, ln('img/Transformer/encoder_norm'))}
  pool = 'gap'
  if 'img/MAPHead_0/probe' in t:
    pool, h = 'map', 'img/MAPHead_0/'
    image['map_head'] = {'probe': t.take(h + 'probe'),
                         'attn': _flax_attention(t.take, h + 'MultiHeadDotProductAttention_0/'),
                         'ln': _flax_norm(t.take, h + 'LayerNorm_0'),
                         'mlp': _flax_mlp(t.take, h + 'MlpBlock_0/')}
  image['proj'] = {'kernel': t.take('img/head/kernel'), 'bias': t.take('img/head/bias')}

  t_pos = t.take('txt/pos_embedding')[0]
  if 'txt/Encoder_0/pos_embedding' in t:          # older checkpoints added it twice
    t_pos = t_pos + t.take('txt/Encoder_0/pos_embedding')[0]
  t_blocks = _flax_encoder(t, 'txt/Encoder_0/')
  text = {'token_embedding': {'embedding': t.take('txt/Embed_0/embedding')},
          'pos_embedding': t_pos,
          'encoder': layout.encoder(t_blocks, ln('txt/Encoder_0/encoder_norm')),
          'proj': {'kernel': t.take('txt/head/kernel'), 'bias': t.take('txt/head/bias')}}
  params = {'image': image, 'text': text, **_scale_and_bias(t, 't', 'b')}
  t.check_all_taken()
  embed_dim = image['proj']['kernel'].shape[1]
  t_width = text['token_embedding']['embedding'].shape[1]
  mlp = lambda blocks: blocks[0]['mlp']['fc1']['kernel'].shape[1]
  towers = {
      'image': _vit_options(width, len(v_blocks), mlp(v_blocks), heads, patch, pool,
                            'gelu_tanh', 1e-6),
      'text': _text_options(t_width, len(t_blocks), mlp(t_blocks),
                            t_blocks[0]['attn']['query']['kernel'].shape[1], False, 'last',
                            'gelu_tanh', 1e-6)}
  notes.append(f'SigLIP text: padded with id 1 (big_vision\'s sticky EOS) to {t_pos.shape[0]} '
               'tokens, all attended, pooled at the last position (as trained)')
  return Imported('big_vision', towers, embed_dim, params, 'sigmoid_contrastive', image_size,
                  HALF, HALF, max_len=t_pos.shape[0], pad_id=1, attend_padding=True,
                  notes=notes)


READERS = {'openai': openai, 'open_clip': openai, 'hf': hf, 'big_vision': big_vision}


def temperature(params: dict[str, Any]) -> float:
  return float(math.exp(float(params['logit_scale'])))
