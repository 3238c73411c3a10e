"""Heat-maps: which patches of an image (or of a spectrogram) a model's output rests on.

Methods (`explain(run, method, ...)`, or `run.explain(method, ...)`):
  rollout   attention rollout (Abnar & Zuidema, 2020): the heads' mean attention of each layer,
            with the residual as 0.5 I, multiplied through the layers; no gradient, so in a
            tower it does not depend on the other modality. Through a cross-attention fusion
            it follows Chefer et al.'s bi-modal rules with plain attention instead of
            gradient-weighted attention, which makes it depend on the text.
  chefer    gradient-weighted relevance (Chefer, Gur & Wolf, ICCV 2021, "Generic
            Attention-model Explainability"): each layer adds E_heads[(grad * A)+] R to the
            relevance R, towers and fusion layers alike (bi-modal rule for cross-attention).
  gradcam   ALBEF's Grad-CAM: a cross-attention layer's map times its positive gradient,
            averaged over heads, one row per query token (per word), for the ITM logit;
            the heat-map is the mean over the real tokens' rows.

What is explained (`target`): 'similarity', the cosine similarity of the explained input's
embedding with the other input's (the contrastive towers; rollout and chefer), or 'itm', the
ITM head's match log-odds through the fusion module (every method; gradcam needs it).

The attention weights come from the model itself, built with `sow_attention=True`: every
MultiHeadAttention sows its weights into 'intermediates' and takes a zero 'perturbations' entry
whose gradient is the gradient w.r.t. the weights (mmfusion/models/attention.py). No attention code
is copied here. Heat-maps are over the explained modality's tokens, folded to its grid: the
image's (H/P, W/P) patches, or the spectrogram's (time, frequency) patches.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmfusion.models import model as model_lib

Array = jax.Array
METHODS = ('rollout', 'chefer', 'gradcam')
TARGETS = ('similarity', 'itm')
WEIGHTS = 'attention_weights'


@dataclasses.dataclass
class Explanation:
  """heatmap [B, rows, cols] in [0, 1] over the explained modality's patches (stretched per
  example over its real patches, `_normalise`); per_token [B, L, rows, cols] for gradcam / fusion targets: one map per token of the
  query (the text), aligned with `query_mask` [B, L] (the fused stream's tokens, cls dropped)."""
  method: str
  target: str
  modality: str
  heatmap: np.ndarray
  per_token: np.ndarray | None = None
  query_mask: np.ndarray | None = None

  def upsample(self, size: tuple[int, int]) -> np.ndarray:
    """heatmap bilinearly resized to `size` (e.g. the image's pixels): [B, *size]."""
    return np.asarray(jax.image.resize(jnp.asarray(self.heatmap),
                                       (self.heatmap.shape[0], *size), 'bilinear'))


# ---------------------------------------------------------------------------- the rules


def head_mean(attention_bhqk: Array, gradient_bhqk: Array | None) -> Array:
  """E_heads[A] (rollout) or E_heads[(grad * A)+] (Chefer et al.): [B, Q, K]."""
  if gradient_bhqk is None:
    return attention_bhqk.mean(axis=1)
  return jnp.maximum(gradient_bhqk * attention_bhqk, 0.0).mean(axis=1)


def rollout(attentions: Sequence[Array], residual: bool = True) -> Array:
  """Abnar & Zuidema's attention rollout of one stack: [B, N, N] relevance of the input tokens
  (columns) to the output tokens (rows). attentions: [B, H, N, N] per layer, first to last."""
  relevance = None
  for attention in attentions:
    a = attention.mean(axis=1)
    if residual:
      a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1])
      a = a / jnp.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
    relevance = a if relevance is None else a @ relevance
  return relevance


def self_relevance(attentions: Sequence[Array], gradients: Sequence[Array | None]) -> Array:
  """Chefer et al.'s rule for self-attention, R = I; R += A_bar R per layer: [B, N, N].
  With gradients None, A_bar is the plain head mean (rollout in additive form)."""
  batch, _, n, _ = attentions[0].shape
  relevance = jnp.broadcast_to(jnp.eye(n), (batch, n, n))
  for attention, gradient in zip(attentions, gradients):
    relevance = relevance + head_mean(attention, gradient) @ relevance
  return relevance


def _normalise_residual(relevance_bnn: Array) -> Array:
  """Chefer et al.'s R_bar: the identity taken out, rows scaled to sum to 1, the identity put back."""
  eye = jnp.eye(relevance_bnn.shape[-1])
  r = relevance_bnn - eye
  return r / jnp.maximum(r.sum(axis=-1, keepdims=True), 1e-12) + eye


def cross_relevance(layers: Sequence[Mapping[str, Any]], context_relevance: Array) -> Array:
  """Chefer et al.'s bi-modal rules for a query stream that reads a context: [B, Q, K], the
  relevance of the context tokens to each query-stream token.

  layers: per fusion layer, first to last, {'self': (A [B,H,Q,Q], grad or None), 'cross':
  (A [B,H,Q,K], grad or None) or absent}. context_relevance [B, K, K]: the context tower's own
  self-relevance (the context never reads the query, so R_kq = 0 and R_qq gets no cross term).
  """
  r_qq = r_qk = None
  context_bar = _normalise_residual(context_relevance)
  for layer in layers:
    a_self = head_mean(*layer['self'])
    if r_qq is None:
      batch, q = a_self.shape[0], a_self.shape[-1]
      r_qq = jnp.broadcast_to(jnp.eye(q), (batch, q, q))
      r_qk = jnp.zeros((batch, q, context_relevance.shape[-1]))
    r_qq, r_qk = r_qq + a_self @ r_qq, r_qk + a_self @ r_qk
    if 'cross' in layer:
      a_cross = head_mean(*layer['cross'])
      r_qk = r_qk + jnp.swapaxes(_normalise_residual(r_qq), 1, 2) @ a_cross @ context_bar
  return r_qk


def gradcam(attention_bhqk: Array, gradient_bhqk: Array) -> Array:
  """ALBEF's Grad-CAM on one cross-attention map: E_heads[A * grad+], [B, Q, K]."""
  return (attention_bhqk * jnp.maximum(gradient_bhqk, 0.0)).mean(axis=1)


# ---------------------------------------------------------------------- reading the model


def _sown(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree[0] if isinstance(tree, tuple) else tree


def _tower_blocks(tree: Mapping[str, Any], modality: str) -> list[Any]:
  """A tower's per-layer attention entries (sown weights or their gradients), in order."""
  encoder = tree[modality]['encoder']
  blocks = sorted((k for k in encoder if k.startswith('block_')), key=lambda k: int(k[6:]))
  if not blocks:
    raise ValueError(f'the {modality} tower has no unrolled blocks to read attention from '
                     '(heat-maps need config.model.scan_layers=False).')
  return [_sown(encoder, (b, 'attn', WEIGHTS)) for b in blocks]


def _tower_relevance(inter, grads, modality: str, pool: str, method: str, mask: Array | None):
  """[B, N, N] over the tower's tokens (cls dropped), and [B, N] for its pooled output."""
  attentions = _tower_blocks(inter, modality)
  gradients = _tower_blocks(grads, modality) if grads is not None else [None] * len(attentions)
  if method == 'rollout':
    r = rollout(attentions)
  else:
    r = self_relevance(attentions, gradients)
  if pool == 'cls':
    pooled, r = r[:, 0, 1:], r[:, 1:, 1:]
  elif pool == 'map':
    a = _sown(inter[modality], ('map_head', 'attn', WEIGHTS))
    g = None if grads is None else _sown(grads[modality], ('map_head', 'attn', WEIGHTS))
    pooled = (head_mean(a, g) @ r)[:, 0]
  else:   # gap: the mean of the real tokens
    w = jnp.ones(r.shape[:2]) if mask is None else mask.astype(jnp.float32)
    pooled = jnp.einsum('bn,bnk->bk', w / jnp.maximum(w.sum(-1, keepdims=True), 1.0), r)
  return r, pooled


def _fusion_layers(inter, grads) -> list[dict[str, Any]]:
  fusion = inter['fusion']
  names = sorted((k for k in fusion if k.startswith('layer_')), key=lambda k: int(k[6:]))
  layers = []
  for name in names:
    entry = {}
    for part in ('self_attn', 'cross_attn'):
      if part in fusion[name]:
        a = _sown(fusion[name], (part, WEIGHTS))
        g = None if grads is None else _sown(grads['fusion'][name], (part, WEIGHTS))
        entry['self' if part == 'self_attn' else 'cross'] = (a, g)
    layers.append(entry)
  return layers


# ------------------------------------------------------------------------------- driving


def _pool(run, modality: str) -> str:
  return dict(run.config.model.towers[modality]).get('pool', 'gap')


def _check(run, method: str, target: str, explained: str, other: str) -> None:
  from mmfusion.api import RunError
  if method not in METHODS:
    raise RunError(f'explain: unknown method {method!r}; known: {METHODS}.')
  if target not in TARGETS:
    raise RunError(f'explain: unknown target {target!r}; known: {TARGETS}.')
  if run.config.model.scan_layers:
    raise RunError('explain: heat-maps read each layer\'s attention; this run scans its layers '
                   '(config.model.scan_layers=True), which they do not support yet.')
  if method == 'gradcam' and target != 'itm':
    raise RunError("explain: gradcam explains the ITM head (target='itm').")
  if target == 'itm':
    run.require_head('itm', "explain(target='itm')")
    fusion = dict(run.config.model.fusion)
    if fusion.get('strategy') != 'cross_attention' or fusion.get('context') != explained:
      raise RunError(f"explain(target='itm') follows a cross-attention fusion whose context is "
                     f"{explained!r}; this run's fusion is {fusion}.")
    if fusion.get('query') != other:
      raise RunError(f"explain(target='itm'): the fusion's query is {fusion.get('query')!r}, "
                     f'not {other!r}.')


def explain(run, method: str = 'chefer', *, target: str | None = None,
            layer: int | None = None, **inputs: Any) -> Explanation:
  """Heat-maps over the patches of the first given modality whose tower does not read tokens
  (an image, a spectrogram), against the other input.

  run.explain('chefer', image=images, text=phrases)           # image patches for each phrase
  run.explain('gradcam', image=images, text=captions)          # + per_token: one map per word
  run.explain('chefer', audio=waves, image=images)             # spectrogram patches

  Inputs pair up (example i of each). target defaults to 'itm' for gradcam, else
  'similarity' (what the pointing game finds most precise on both kinds of run). layer: gradcam's
  cross-attention layer; default the second from the top (ALBEF also reads one below the
  top: in the top layer only the fused cls row reaches the ITM head, so the word rows have no
  gradient; asked for explicitly, the top layer's map is the cls row's).
  """
  from mmfusion.api import RunError
  given = [m for m in inputs]
  if len(given) != 2:
    raise RunError(f'explain: give two modalities (the explained one and the other), e.g. '
                   f'image=..., text=...; got {given}.')
  explained = next((m for m in given if not run.reads_tokens(m)), given[0])
  other = next(m for m in given if m != explained)
  for m in given:
    run.check_modality(m, 'explain')
  if target is None:
    target = 'itm' if method == 'gradcam' else 'similarity'
  _check(run, method, target, explained, other)
  entries = {**run.inputs(explained, inputs[explained]), **run.inputs(other, inputs[other])}
  sizes = {len(v) for v in entries.values()}
  if len(sizes) != 1:
    raise RunError(f'explain: give as many {other} inputs as {explained} inputs (pairs).')

  model = run.sowing_model
  fn = functools.partial(_explain_batch, model, method=method, target=target,
                         explained=explained, other=other, pool=_pool(run, explained),
                         layer=layer)
  out = run.batched(('explain', method, target, explained, other, layer), fn, entries)
  grid = token_grid(run, explained, out['heatmap'].shape[-1])
  real = out.get('token_mask')
  heat = _normalise(out['heatmap'].reshape(-1, *grid),
                    None if real is None else real.reshape(-1, *grid))
  per_token = out.get('per_token')
  if per_token is not None:
    per_token = _normalise(per_token.reshape(*per_token.shape[:2], *grid),
                           None if real is None else real.reshape(-1, 1, *grid))
  return Explanation(method, target, explained, heat, per_token, out.get('query_mask'))


def _explain_batch(model, params, batch, *, method, target, explained, other, pool, layer):
  """One batch of explain(): the target's score, then `maps`."""
  def score(module, batch):
    encoded = {m: module.encode(m, batch[m], batch.get(f'{m}_mask')) for m in (explained, other)}
    if target == 'itm':
      logits = module.fused_logits('itm', encoded).astype(jnp.float32)
      return logits[:, 1] - logits[:, 0]
    za, zb = (model_lib.l2_normalize(encoded[m].embedding.astype(jnp.float32))
              for m in (explained, other))
    return jnp.sum(za * zb, axis=-1)
  return maps(model, params, batch, score, explained=explained, method=method, pool=pool,
              fused_query=other if target == 'itm' else None, layer=layer)


def maps(model, params, batch, score, *, explained: str, method: str, pool: str = 'gap',
         fused_query: str | None = None, layer: int | None = None) -> dict[str, Array]:
  """Heat-maps of one batch for any differentiable score: model is built with
  sow_attention=True; score(module, batch) -> [B] (one scalar per example).

  Returns {'heatmap': [B, N]} over the explained tower's tokens; through a cross-attention
  fusion whose query is `fused_query` (ITM), also 'per_token' [B, L, N] and 'query_mask' [B, L].
  """
  variables = {'params': params}
  _, state = model.apply(variables, batch, method=score, mutable=['perturbations'])
  zeros = state['perturbations']

  def total(perturbations):
    out, inter = model.apply({**variables, 'perturbations': perturbations}, batch,
                             method=score, mutable=['intermediates'])
    # Examples are independent, so the gradient of the sum is each one's own gradient.
    return out.sum(), inter['intermediates']

  grads, inter = jax.grad(total, has_aux=True)(zeros)
  grads = None if method == 'rollout' else grads
  # Which tokens are real comes from the tower (e.g. audio patches); None when all are.
  mask = batch.get(f'{explained}_mask')
  token_mask = None if mask is None else _token_mask(model, params, batch, explained)
  r_tower, pooled = _tower_relevance(inter, grads, explained, pool, method, token_mask)
  out = {}
  if fused_query is None:
    out['heatmap'] = pooled
  elif method == 'gradcam':
    cross = [entry['cross'] for entry in _fusion_layers(inter, grads) if 'cross' in entry]
    if layer is None:   # as ALBEF, below the top: the last layer's token rows reach no output
      layer = max(len(cross) - 2, 0)
    cam = gradcam(*cross[layer])                        # [B, 1 + L, K]
    query_mask = _token_mask(model, params, batch, fused_query)
    w = query_mask.astype(jnp.float32)
    out['per_token'] = cam[:, 1:]
    out['query_mask'] = query_mask
    if layer % len(cross) == len(cross) - 1:
      out['heatmap'] = cam[:, 0]        # the top layer: only the fused cls row has a gradient
    else:
      out['heatmap'] = jnp.einsum('bl,blk->bk', w / jnp.maximum(w.sum(-1, keepdims=True), 1.0),
                                  cam[:, 1:])
  else:
    r_qk = cross_relevance(_fusion_layers(inter, grads), r_tower)     # [B, 1 + L, K]
    out['heatmap'] = r_qk[:, 0]                         # the fused cls, which the ITM reads
    out['per_token'] = r_qk[:, 1:]
    out['query_mask'] = _token_mask(model, params, batch, fused_query)
  if token_mask is not None:
    out['heatmap'] = jnp.where(token_mask, out['heatmap'], 0.0)
    out['token_mask'] = token_mask
  return out


def _token_mask(model, params, batch, modality: str) -> Array:
  """[B, N] bool: the tower's mask of real tokens (an image's are all real)."""
  return model.apply({'params': params}, modality, batch[modality],
                     batch.get(f'{modality}_mask'), method=type(model).encode).mask


def _normalise(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Each map stretched to [0, 1] over its real tokens (min -> 0, max -> 1; 0 where masked):
  relevance through residual streams keeps every token's own share, so the contrast, not the
  level, is what a map shows. The argmax is unchanged."""
  x = np.asarray(x, np.float32)
  flat = x.reshape(*x.shape[:-2], -1)
  real = np.ones_like(flat, bool) if mask is None else mask.reshape(flat.shape)
  lo = np.where(real, flat, np.inf).min(-1, keepdims=True)
  hi = np.where(real, flat, -np.inf).max(-1, keepdims=True)
  out = np.where(real, (flat - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
  return out.reshape(x.shape)


def token_grid(run, modality: str, num_tokens: int) -> tuple[int, int]:
  """The (rows, cols) a modality's tokens fold to: a spectrogram's (time, frequency) patches
  (a tower with an audio front-end), an image's patch grid (a tower with a patch size);
  anything else is one row."""
  tower = run.model.towers[modality]
  if hasattr(tower, 'frontend'):
    num_freq = (tower.frontend.num_features - tower.patch_freq) // tower.strides[1] + 1
    return (num_tokens // num_freq, num_freq)
  if hasattr(tower, 'patch_size'):
    side = run.config.data.image_size // tower.patch_size
    return (num_tokens // side, side)
  return (1, num_tokens)
