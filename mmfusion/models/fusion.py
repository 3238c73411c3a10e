"""Fusion of several modalities' tower outputs, one strategy chosen by config, and its heads.

Strategies (`Fusion.strategy`):
  cross_attention  ALBEF: the query modality's stream runs through `depth` blocks; from layer
                   `start_layer` on each block also cross-attends to the context modality.
  co_attention     ViLBERT: two streams; in every layer each cross-attends to the other.
  early            one stream: [cls; tokens of every modality + a modality-type embedding].
  bottleneck       MBT: a stream per modality; from layer `start_layer` on they exchange
                   information only through `num_bottleneck` shared latent tokens.
  weighted_sum     the pooled vectors, mixed by learned softmax weights or sigmoid gates.
  late             no fusion of features: FusionHead combines per-modality logits.

Every token stream gets a learned summary token ('cls') in front; the fused summaries are its
outputs. Padding is masked everywhere: padded keys get exactly zero attention, and padded token
values are zeroed on the way in, so no output (padded positions included) depends on them.

`config.model.fusion = dict(strategy=..., ...)` takes that strategy's keys only (`OPTIONS`);
`build` makes the module from it, `Classifier` is the head every fused classification task uses.
(One file of ~550 lines on purpose: the six strategies are methods of one module over one
output contract, share the missing-modality stand-ins, and read best side by side.)
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import layers
from mmfusion.models.attention import MultiHeadAttention

Array = jax.Array
Dtype = Any

STRATEGIES = ('cross_attention', 'co_attention', 'early', 'bottleneck', 'weighted_sum', 'late')
TOKEN_STRATEGIES = ('cross_attention', 'co_attention', 'early', 'bottleneck')  # run fusion blocks

GATES = ('weights', 'gates')
COMBINES = ('mean', 'learned')

# Each strategy's config keys and their defaults; None = required (a modality name, which only
# the experiment can know).
_STACK = dict(width=96, depth=2, num_heads=4, mlp_dim=384, dropout=0.0)
OPTIONS: dict[str, dict[str, Any]] = {
    'cross_attention': dict(**_STACK, query=None, context=None, start_layer=0),
    'co_attention': dict(_STACK),
    'early': dict(_STACK),
    'bottleneck': dict(**_STACK, start_layer=0, num_bottleneck=4),
    'weighted_sum': dict(width=96, gate='weights'),
    'late': dict(width=96, combine='learned'),    # how the per-modality logits are mixed
}
# Every strategy also takes modality_dropout = {modality: probability}: those modalities may be
# absent (see Fusion), and in training each example drops them with that probability.
for _options in OPTIONS.values():
  _options['modality_dropout'] = {}

BLE = ('batch', 'length', 'embed')
BE = ('batch', 'embed')


def check_strategy(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f'unknown fusion strategy {strategy!r}; known strategies: {STRATEGIES}')


def options(fusion_config: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model.fusion` with the strategy's defaults filled in ({} for no fusion). A key the
  strategy does not take, or a required one left out, fails naming it."""
  fusion_config = dict(fusion_config)
  strategy = fusion_config.pop('strategy', '')
  if not strategy:
    if fusion_config:
      raise ValueError(f'config.model.fusion has {sorted(fusion_config)} but no strategy; set '
                       f'config.model.fusion.strategy to one of {STRATEGIES}.')
    return {}
  if strategy not in STRATEGIES:
    raise ValueError(f'config.model.fusion.strategy = {strategy!r}: unknown; known strategies: '
                     f'{STRATEGIES}.')
  allowed = OPTIONS[strategy]
  unknown = sorted(set(fusion_config) - set(allowed))
  if unknown:
    raise ValueError(f'config.model.fusion has {unknown}, which strategy {strategy!r} does not '
                     f'take; it takes {sorted(allowed)}.')
  merged = {**allowed, **fusion_config}
  missing = sorted(k for k, v in merged.items() if v is None)
  if missing:
    raise ValueError(f'config.model.fusion: strategy {strategy!r} needs {missing} (modality '
                     'names).')
  return {'strategy': strategy, **merged}


def build(fusion_config: Mapping[str, Any], stack_of) -> Fusion | None:
  """The Fusion module for `config.model.fusion` (None without a strategy). `stack_of(options)`
  turns the size keys into StackOptions with the model's compute settings (towers.BuildContext.
  stack); the pooled-vector strategies have no blocks and only use its width and dtypes."""
  opts = options(fusion_config)
  if not opts:
    return None
  strategy = opts['strategy']
  sizes = dict(depth=0, mlp_dim=opts['width'], num_heads=1)   # for strategies with no blocks
  sizes.update({k: opts[k] for k in ('depth', 'mlp_dim', 'num_heads') if k in opts})
  dropout = dict(opts['modality_dropout'])
  for m, rate in dropout.items():
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
      raise ValueError(f'config.model.fusion.modality_dropout.{m} = {rate!r}: a probability in '
                       '[0, 1) is needed.')
  try:
    return Fusion(strategy=strategy, stack=stack_of({**opts, **sizes}),
                  modality_dropout=tuple(sorted((m, float(r)) for m, r in dropout.items())),
                  query=opts.get('query', ''), context=opts.get('context', ''),
                  start_layer=opts.get('start_layer', 0),
                  num_bottleneck=opts.get('num_bottleneck', 1), gate=opts.get('gate', GATES[0]),
                  combine=opts.get('combine', COMBINES[0]))
  except ValueError as e:
    raise ValueError(f'config.model.fusion: {e}') from e


class FusionBlock(nn.Module):
  """Pre-LN block: x + self_attn(LN x), then (cross=True) x + cross_attn(LN x, LN context),
  then x + mlp(LN x); dropout on each branch as in encoder.EncoderBlock.

  mask_bn / context_mask_bm are key masks (True = real token): no query ever attends to a
  False key. The context gets its own LayerNorm ('ln_context') because it may be another
  stream's un-normalised residual state (co_attention), not a tower's normalised output.
  Submodules: ln_self, self_attn, [ln_cross, ln_context, cross_attn], ln_mlp, mlp; so sown
  weights sit at '<block>/self_attn/attention_weights' and '<block>/cross_attn/...'.
  """
  stack: layers.StackOptions
  cross: bool = False

  @nn.compact
  def __call__(self, x_bnw: Array, mask_bn: Array, context_bmw: Array | None = None,
               context_mask_bm: Array | None = None, deterministic: bool = True) -> Array:
    stack = self.stack
    norm = functools.partial(layers.stack_norm, stack)
    attention = functools.partial(MultiHeadAttention, stack)
    residual = lambda x, y: layers.constrain(
        x + nn.Dropout(stack.dropout)(y, deterministic), BLE)

    x_bnw = layers.constrain(x_bnw, BLE)
    y = attention(name='self_attn')(norm('ln_self')(x_bnw), mask=mask_bn[:, None, None, :])
    x_bnw = residual(x_bnw, y)

    if self.cross:
      if context_bmw is None or context_mask_bm is None:
        raise ValueError('a cross-attention fusion block needs context tokens and their mask')
      context_bmw = norm('ln_context')(layers.constrain(context_bmw, BLE))
      y = attention(name='cross_attn')(norm('ln_cross')(x_bnw), context_bmw,
                                       mask=context_mask_bm[:, None, None, :])
      x_bnw = residual(x_bnw, y)

    y = layers.MlpBlock(stack, name='mlp')(norm('ln_mlp')(x_bnw), deterministic)
    return residual(x_bnw, y)


def _masked_mean(x_bnw: Array, mask_bn: Array) -> Array:
  """Mean over the real tokens ([B, W], float32 accumulation); a row with none gives zeros."""
  weights_bn1 = mask_bn.astype(jnp.float32)[:, :, None]
  count_b1 = jnp.maximum(jnp.sum(weights_bn1, axis=1), 1.0)
  return (jnp.sum(x_bnw.astype(jnp.float32) * weights_bn1, axis=1) / count_b1).astype(x_bnw.dtype)


def _with_true(mask_bn: Array, count: int, front: bool) -> Array:
  """mask_bn with `count` True columns added in front (a cls) or at the back (bottleneck)."""
  ones_bc = jnp.ones((mask_bn.shape[0], count), jnp.bool_)
  parts = [ones_bc, mask_bn] if front else [mask_bn, ones_bc]
  return jnp.concatenate(parts, axis=1)


class Fusion(nn.Module):
  """Fuses the tower outputs of any set of modalities (at least two) with one strategy.

  `__call__(tokens, masks, pooled, train=False)`: tokens {m: [B, N_m, W_m]}, masks
  {m: [B, N_m] bool, True = real token}, pooled {m: [B, W_m]} (the towers' pooled vectors).
  The modalities are the keys of `tokens` for the token strategies and of `pooled` for
  weighted_sum / late (the other dict is not read and may be empty); `masks` must cover every
  token modality. They are taken in sorted name order, so a dict's insertion order never
  changes params or outputs. Each modality is first projected to `width` by a Dense 'in_{m}'
  (its tokens for token strategies, its pooled vector for weighted_sum / late).

  Returns a dict:
    pooled              [B, width] the fused summary: the stream's cls output (cross_attention,
                        early), the mean of the streams' cls outputs (co_attention,
                        bottleneck), the weighted / gated sum (weighted_sum); None for late.
    pooled_by_modality  {m: [B, width]}: each stream's cls output (cross_attention: the query
                        only; co_attention, bottleneck: every modality); early: the masked mean
                        of m's fused tokens; weighted_sum, late: the projected pooled vectors.
    tokens_by_modality  {m: [B, N_m, width]}, aligned with tokens[m] / masks[m] (cls dropped),
                        for the modalities that have a token stream: cross_attention -> the
                        query; co_attention, early, bottleneck -> all; weighted_sum, late -> {}.
    tokens, mask        [B, N, width], [B, N] bool: the whole fused sequence, cls tokens
                        included: cross_attention [cls; query], early [cls; m_1; m_2; ...],
                        co_attention [cls_1; m_1; cls_2; m_2], bottleneck the same followed by
                        the bottleneck tokens (mask True). None for weighted_sum / late.

  cross_attention reads only the query's and the context's tokens (other modalities are
  ignored). bottleneck follows MBT: the bottleneck a stream reads in layer i is the mean of
  what the streams wrote in layer i-1, so the other modality reaches a stream's tokens from
  layer start_layer + 1 on; with start_layer >= depth - 1 only the final bottleneck tokens (the
  tail of 'tokens') mix the modalities, and the summaries stay unimodal.

  Padded positions of the token outputs hold values that depend on the params and the real
  tokens only (padded inputs are zeroed first); read them through the mask.

  Missing modalities: each modality named in `modality_dropout` has a learned token
  'missing_{m}' [width]. When m is absent from the inputs, it enters the fusion as that one
  token (mask True) in place of its projected tokens or pooled vector, so a fused model still
  runs and answers without it; in training, each example independently replaces m by it with
  the given probability (random stream 'dropout'), which teaches the model to do without.

  stack.sow_weights records every fusion attention's weights [B, heads, Lq, Lk] into
  'intermediates/<block>/{self_attn,cross_attn}/attention_weights' (and weighted_sum's
  per-modality weights into 'intermediates/modality_weights'). The fused kernels never
  materialise attention weights, so it needs stack.attention_impl='explicit', which
  towers.BuildContext.stack (what model.build uses) picks whenever attention is sown.

  Param names: in_{m}; cls (single-stream) or {m}_cls; layer_{i} (single-stream) or
  {m}_layer_{i}; norm or {m}_norm; type_embedding [M, width] (early); bottleneck [n, width] and
  bottleneck_norm (bottleneck); modality_logits [M] or gate (weighted_sum).

  `stack` holds the sizes (width, depth, num_heads, mlp_dim) and compute settings; `combine`
  is late fusion's, read by the Classifier of each head (see `classifier`).
  """
  strategy: str
  stack: layers.StackOptions
  query: str = ''
  context: str = ''
  start_layer: int = 0
  num_bottleneck: int = 4
  gate: str = 'weights'
  combine: str = 'learned'
  modality_dropout: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    check_strategy(self.strategy)
    depth = self.stack.depth
    if self.strategy in ('cross_attention', 'bottleneck') and not 0 <= self.start_layer <= depth:
      raise ValueError(f'fusion strategy {self.strategy} has start_layer={self.start_layer}, '
                       f'outside [0, depth={depth}]')
    if self.strategy == 'cross_attention' and self.query == self.context:
      raise ValueError(f'fusion strategy cross_attention needs two different modalities for '
                       f'query and context; both are {self.query!r}')
    if self.strategy == 'bottleneck' and self.num_bottleneck <= 0:
      raise ValueError(f'fusion strategy bottleneck needs num_bottleneck > 0; got '
                       f'{self.num_bottleneck}')
    if self.strategy == 'weighted_sum' and self.gate not in GATES:
      raise ValueError(f'fusion gate={self.gate!r}; expected one of {GATES}')
    if self.combine not in COMBINES:
      raise ValueError(f'fusion combine={self.combine!r}; expected one of {COMBINES}')
    super().__post_init__()

  @property
  def width(self) -> int:
    return self.stack.width

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array],
               pooled: Mapping[str, Array], *, train: bool = False) -> dict[str, Any]:
    if self.strategy in TOKEN_STRATEGIES:
      names = self._modalities({**dict.fromkeys(self._absent(tokens)), **tokens})
      x, mask = self._project_tokens(tokens, masks, names)
      x, mask = self._stand_in_tokens(names, x, mask, train)
      run = {'cross_attention': self._cross_attention, 'co_attention': self._co_attention,
             'early': self._early, 'bottleneck': self._bottleneck}[self.strategy]
      return run(names, x, mask, not train)
    names = self._modalities({**dict.fromkeys(self._absent(pooled)), **pooled})
    p = {m: layers.constrain(self._in_proj(m)(pooled[m]), BE) for m in names if m in pooled}
    p = self._stand_in_pooled(names, p, train)
    if self.strategy == 'weighted_sum':
      return self._weighted_sum(names, p)
    return dict(pooled=None, pooled_by_modality=p, tokens_by_modality={}, tokens=None, mask=None)

  # -- inputs ---------------------------------------------------------------------------------

  def _modalities(self, given: Mapping[str, Array]) -> list[str]:
    names = sorted(given)
    if len(names) < 2:
      raise ValueError(f'fusion strategy {self.strategy} needs at least two modalities; the '
                       f'batch has {names}')
    if self.strategy == 'co_attention' and len(names) != 2:
      raise ValueError(f'fusion strategy co_attention runs exactly two streams; the batch has '
                       f'{len(names)} modalities: {names}')
    if self.strategy == 'cross_attention':
      for role, name in (('queries', self.query), ('attends to context', self.context)):
        if name not in names:
          raise ValueError(f'fusion strategy cross_attention {role} {name!r}, which the batch '
                           f'lacks; it has {names}')
    return names

  def _in_proj(self, m: str) -> nn.Dense:
    # The input dim is the tower's width, which need not match the fused one: left unnamed.
    return nn.Dense(
        self.width, dtype=self.stack.dtype, param_dtype=self.stack.param_dtype,
        kernel_init=layers.named_init(nn.initializers.lecun_normal(), (None, 'embed')),
        bias_init=layers.named_init(nn.initializers.zeros, ('embed',)), name=f'in_{m}')

  def _project_tokens(self, tokens, masks, names):
    """{m: [B, N_m, width]} projected tokens (zero at padding) and {m: [B, N_m] bool}."""
    used = [self.query, self.context] if self.strategy == 'cross_attention' else names
    x, mask = {}, {}
    for m in (m for m in used if m in tokens):
      if m not in masks:
        raise ValueError(f'fusion has tokens for {m!r} but no mask for them; masks has '
                         f'{sorted(masks)}')
      if masks[m].shape != tokens[m].shape[:2]:
        raise ValueError(f'{m} mask shape {masks[m].shape} does not match its tokens '
                         f'{tokens[m].shape}')
      mask[m] = masks[m].astype(jnp.bool_)
      # Zero padding before anything reads it: masked attention already ignores padded keys,
      # but 0 * NaN = NaN, so non-finite garbage in padded slots must not get that far.
      x_bnw = jnp.where(mask[m][..., None], tokens[m], 0)
      x[m] = layers.constrain(self._in_proj(m)(x_bnw), BLE)
    return x, mask

  # -- missing modalities --------------------------------------------------------------------

  def _absent(self, given: Mapping[str, Any]) -> list[str]:
    return [m for m, _ in self.modality_dropout if m not in given]

  def _missing_token(self, m: str) -> Array:
    init = layers.named_init(nn.initializers.normal(stddev=0.02), ('embed',))
    return self.param(f'missing_{m}', init, (self.width,), self.stack.param_dtype).astype(
        self.stack.dtype)

  def _dropped(self, m: str, batch: int, train: bool) -> Array | None:
    """[B] bool: the examples whose m is replaced by its missing token (training only)."""
    rate = dict(self.modality_dropout)[m]
    if not train or rate <= 0.0:
      return None
    return jax.random.bernoulli(self.make_rng('dropout'), rate, (batch,))

  def _stand_in_tokens(self, names, x, mask, train: bool):
    """Absent (or dropped) modalities as their missing token: [B, 1, width], mask True (a
    dropped example keeps its length: the token in front, the rest masked out)."""
    batch = next(iter(x.values())).shape[0]
    for m, _ in self.modality_dropout:
      if m not in names or (m not in x and self.strategy == 'cross_attention'
                            and m not in (self.query, self.context)):
        continue
      token_w = self._missing_token(m)
      if m not in x:
        x[m] = jnp.broadcast_to(token_w, (batch, 1, self.width))
        mask[m] = jnp.ones((batch, 1), jnp.bool_)
        continue
      dropped_b = self._dropped(m, batch, train)
      if dropped_b is not None:
        first_n = jnp.arange(x[m].shape[1]) == 0
        stand_in_bnw = jnp.where(first_n[None, :, None], token_w, 0).astype(x[m].dtype)
        x[m] = jnp.where(dropped_b[:, None, None], stand_in_bnw, x[m])
        mask[m] = jnp.where(dropped_b[:, None], first_n[None, :], mask[m])
    return x, mask

  def _stand_in_pooled(self, names, p, train: bool):
    batch = next(iter(p.values())).shape[0]
    for m, _ in self.modality_dropout:
      if m not in names:
        continue
      token_w = self._missing_token(m)
      if m not in p:
        p[m] = jnp.broadcast_to(token_w, (batch, self.width))
        continue
      dropped_b = self._dropped(m, batch, train)
      if dropped_b is not None:
        p[m] = jnp.where(dropped_b[:, None], token_w.astype(p[m].dtype), p[m])
    return p

  # -- building blocks ------------------------------------------------------------------------

  def _block(self, name: str, cross: bool = False) -> FusionBlock:
    # argnum 0 is the module, so 5 is `deterministic` (a Python bool: must be static).
    block_cls = layers.remat_module(FusionBlock, self.stack, 5)
    return block_cls(self.stack, cross=cross, name=name)

  def _norm(self, name: str) -> nn.LayerNorm:
    return layers.stack_norm(self.stack, name)

  def _prepend_cls(self, name: str, x_bnw: Array, mask_bn: Array) -> tuple[Array, Array]:
    cls_11w = self.param(name, layers.named_init(nn.initializers.zeros, (None, None, 'embed')),
                         (1, 1, self.width), self.stack.param_dtype)
    cls_b1w = jnp.tile(cls_11w.astype(self.stack.dtype), (x_bnw.shape[0], 1, 1))
    x_bnw = layers.constrain(jnp.concatenate([cls_b1w, x_bnw], axis=1), BLE)
    return x_bnw, _with_true(mask_bn, 1, front=True)

  # -- strategies -----------------------------------------------------------------------------

  def _cross_attention(self, names, x, mask, deterministic: bool) -> dict[str, Any]:
    q, c = self.query, self.context
    x_bnw, mask_bn = self._prepend_cls('cls', x[q], mask[q])
    for i in range(self.stack.depth):
      cross = i >= self.start_layer
      x_bnw = self._block(f'layer_{i}', cross)(
          x_bnw, mask_bn, x[c] if cross else None, mask[c] if cross else None, deterministic)
    x_bnw = layers.constrain(self._norm('norm')(x_bnw), BLE)
    pooled_bw = layers.constrain(x_bnw[:, 0], BE)
    return dict(pooled=pooled_bw, pooled_by_modality={q: pooled_bw},
                tokens_by_modality={q: x_bnw[:, 1:]}, tokens=x_bnw, mask=mask_bn)

  def _co_attention(self, names, x, mask, deterministic: bool) -> dict[str, Any]:
    xs, masks = {}, {}
    for m in names:
      xs[m], masks[m] = self._prepend_cls(f'{m}_cls', x[m], mask[m])
    a, b = names
    for i in range(self.stack.depth):
      # Both directions read the states from before this layer (dict built from the old xs).
      xs = {m: self._block(f'{m}_layer_{i}', cross=True)(xs[m], masks[m], xs[o], masks[o],
                                                         deterministic)
            for m, o in ((a, b), (b, a))}
    return self._streams_out(names, xs, masks, extra=None)

  def _early(self, names, x, mask, deterministic: bool) -> dict[str, Any]:
    type_mw = self.param(
        'type_embedding', layers.named_init(nn.initializers.normal(stddev=0.02), (None, 'embed')),
        (len(names), self.width), self.stack.param_dtype).astype(self.stack.dtype)
    x_bnw = jnp.concatenate([x[m] + type_mw[j] for j, m in enumerate(names)], axis=1)
    mask_bn = jnp.concatenate([mask[m] for m in names], axis=1)
    x_bnw, mask_bn = self._prepend_cls('cls', x_bnw, mask_bn)
    for i in range(self.stack.depth):
      x_bnw = self._block(f'layer_{i}')(x_bnw, mask_bn, None, None, deterministic)
    x_bnw = layers.constrain(self._norm('norm')(x_bnw), BLE)

    by_modality, start = {}, 1
    for m in names:
      n = x[m].shape[1]
      by_modality[m] = x_bnw[:, start:start + n]
      start += n
    pooled_bw = layers.constrain(x_bnw[:, 0], BE)
    return dict(pooled=pooled_bw,
                pooled_by_modality={m: _masked_mean(by_modality[m], mask[m]) for m in names},
                tokens_by_modality=by_modality, tokens=x_bnw, mask=mask_bn)

  def _bottleneck(self, names, x, mask, deterministic: bool) -> dict[str, Any]:
    xs, masks = {}, {}
    for m in names:
      xs[m], masks[m] = self._prepend_cls(f'{m}_cls', x[m], mask[m])
    # Random, not zero, init: the bottleneck tokens have no positions, so tokens that start
    # equal would stay equal (same inputs, same attention) and act as one.
    z_nw = self.param(
        'bottleneck', layers.named_init(nn.initializers.normal(stddev=0.02), (None, 'embed')),
        (self.num_bottleneck, self.width), self.stack.param_dtype)
    batch = next(iter(xs.values())).shape[0]
    z_bnw = jnp.tile(z_nw.astype(self.stack.dtype)[None], (batch, 1, 1))
    for i in range(self.stack.depth):
      if i < self.start_layer:
        xs = {m: self._block(f'{m}_layer_{i}')(xs[m], masks[m], None, None, deterministic)
              for m in names}
        continue
      zs = []
      for m in names:
        n = xs[m].shape[1]
        y_bnw = self._block(f'{m}_layer_{i}')(
            jnp.concatenate([xs[m], z_bnw], axis=1),
            _with_true(masks[m], self.num_bottleneck, front=False), None, None, deterministic)
        xs[m] = y_bnw[:, :n]
        zs.append(y_bnw[:, n:])
      # MBT: the streams' updated copies of the bottleneck are averaged into the next one.
      z_bnw = layers.constrain(jnp.mean(jnp.stack(zs), axis=0), BLE)
    z_bnw = layers.constrain(self._norm('bottleneck_norm')(z_bnw), BLE)
    return self._streams_out(names, xs, masks, extra=z_bnw)

  def _streams_out(self, names, xs, masks, extra: Array | None) -> dict[str, Any]:
    """The output dict of the multi-stream strategies: per-stream norm, cls summaries and their
    mean, and the streams concatenated (then `extra` tokens, all real)."""
    xs = {m: layers.constrain(self._norm(f'{m}_norm')(xs[m]), BLE) for m in names}
    by_modality = {m: layers.constrain(xs[m][:, 0], BE) for m in names}
    pooled_bw = jnp.mean(jnp.stack([by_modality[m] for m in names]), axis=0)
    tokens = [xs[m] for m in names]
    mask = [masks[m] for m in names]
    if extra is not None:
      tokens.append(extra)
      mask.append(jnp.ones(extra.shape[:2], jnp.bool_))
    return dict(pooled=layers.constrain(pooled_bw, BE), pooled_by_modality=by_modality,
                tokens_by_modality={m: xs[m][:, 1:] for m in names},
                tokens=layers.constrain(jnp.concatenate(tokens, axis=1), BLE),
                mask=jnp.concatenate(mask, axis=1))

  def _weighted_sum(self, names, p) -> dict[str, Any]:
    p_mbw = jnp.stack([p[m] for m in names])
    if self.gate == 'weights':
      # Zero init: the fusion starts as the plain mean of the projections.
      logits_m = self.param('modality_logits', layers.named_init(nn.initializers.zeros, (None,)),
                            (len(names),), self.stack.param_dtype)
      w_bm = jnp.broadcast_to(jax.nn.softmax(logits_m.astype(jnp.float32)),
                              (p_mbw.shape[1], len(names)))
    else:
      # Gates are per example and independent (sigmoid, not softmax): each modality can be
      # switched on or off on its own, e.g. when one of them carries no information.
      gate_in = jnp.concatenate([p[m] for m in names], axis=-1)
      w_bm = jax.nn.sigmoid(nn.Dense(
          len(names), dtype=self.stack.dtype, param_dtype=self.stack.param_dtype,
          kernel_init=layers.named_init(nn.initializers.lecun_normal(), ('embed', None)),
          bias_init=layers.named_init(nn.initializers.zeros, (None,)), name='gate')(
              gate_in).astype(jnp.float32))
    if self.stack.sow_weights:
      self.sow('intermediates', 'modality_weights', w_bm)
    fused_bw = jnp.einsum('bm,mbw->bw', w_bm, p_mbw.astype(jnp.float32)).astype(self.stack.dtype)
    return dict(pooled=layers.constrain(fused_bw, BE), pooled_by_modality=p,
                tokens_by_modality={}, tokens=None, mask=None)


def classifier(fusion: Fusion, num_classes: int) -> 'Classifier':
  """An (unbound) Classifier over `fusion`'s outputs: what the fused heads classify with."""
  return Classifier(num_classes, strategy=fusion.strategy, combine=fusion.combine,
                    dtype=fusion.stack.dtype, param_dtype=fusion.stack.param_dtype)


class Classifier(nn.Module):
  """Classification head over a Fusion output -> logits [B, num_classes] float32.

  Every strategy but 'late': Dense 'head' on 'pooled'. 'late': a Dense 'head_{m}' per modality
  on 'pooled_by_modality', whose logits are combined: combine='mean' averages them, 'learned'
  weights them by softmax(learned per-modality scalars 'combine_logits', zero init = mean).
  The Dense kernels start at zero (as heads.ClassificationHead's), so a fresh head
  predicts uniformly.
  """
  num_classes: int
  strategy: str
  combine: str = 'learned'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    check_strategy(self.strategy)
    if self.combine not in COMBINES:
      raise ValueError(f'fusion head combine={self.combine!r}; expected one of {COMBINES}')
    if self.num_classes <= 0:
      raise ValueError(f'fusion head num_classes must be positive; got {self.num_classes}')
    super().__post_init__()

  def _dense(self, name: str) -> nn.Dense:
    return nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.named_init(nn.initializers.zeros, ('embed', 'classes')),
        bias_init=layers.named_init(nn.initializers.zeros, ('classes',)), name=name)

  @nn.compact
  def __call__(self, fusion_out: Mapping[str, Any]) -> Array:
    if self.strategy != 'late':
      if fusion_out['pooled'] is None:
        raise ValueError(f'fusion head for strategy {self.strategy} got no fused pooled vector '
                         "(a 'late' fusion output?)")
      return self._dense('head')(fusion_out['pooled']).astype(jnp.float32)
    by_modality = fusion_out['pooled_by_modality']
    names = sorted(by_modality)
    logits_mbc = jnp.stack(
        [self._dense(f'head_{m}')(by_modality[m]).astype(jnp.float32) for m in names])
    if self.combine == 'mean':
      return jnp.mean(logits_mbc, axis=0)
    combine_m = self.param('combine_logits', layers.named_init(nn.initializers.zeros, (None,)),
                           (len(names),), self.param_dtype)
    w_m = jax.nn.softmax(combine_m.astype(jnp.float32))
    return jnp.einsum('m,mbc->bc', w_m, logits_mbc)
