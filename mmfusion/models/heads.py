"""Task heads on the towers' outputs, one per `config.model.heads.<name>` (the name is its type, its
key in the model's outputs and its param sub-tree):

  classification  logits over classes from one modality's pooled vector
  itm             match / no match of a pair of modalities, fused; in training with ALBEF's
                  in-batch hard negatives drawn from the pair's contrastive similarities
  mlm             a token modality's masked tokens (BERT 80/10/10) predicted after fusion
  vqa             answers (as classes) to the batch's `question`, read by one modality's tower
                  and fused with a context modality
  caption         a causal decoder (CoCa) writing a token modality while cross-attending to the
                  context modality's tokens

Each head is called with the forward pass's `Forward` and returns its outputs, or None when the
batch lacks what it reads (e.g. an image-only evaluation batch). `OPTIONS` lists each head's
config keys; None marks the modality names every experiment must give.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfusion.models import decoder as decoder_lib
from mmfusion.models import fusion as fusion_lib
from mmfusion.models import layers
from mmfusion.models import sampling
from mmfusion.models import towers
from mmfusion.vocab import BOS_ID

Array = jax.Array
Dtype = Any

OPTIONS: dict[str, dict[str, Any]] = {
    # num_classes -1: as many as the dataset's label classes (resolved by the trainer).
    'classification': dict(num_classes=-1, input=None),
    'itm': dict(pair=None),
    'mlm': dict(modality=None, context=None),
    # answers -1: the train split's answer vocabulary (resolved by the trainer).
    'vqa': dict(answers=-1, question=None, context=None),
    'caption': dict(target=None, context=None, width=96, depth=2, mlp_dim=384, num_heads=4,
                    dropout=0.0, max_len=16),
}
FUSED = ('itm', 'mlm', 'vqa')   # heads that run on the fusion module's outputs
RNG_STREAMS = ('sample', 'mask')   # what ITM's negatives and MLM's masks draw from in training


@dataclasses.dataclass(frozen=True)
class Forward:
  """What a head sees of one forward pass. `encode(modality, inputs, mask)` runs a tower (in the
  pass's train mode); `fuse({modality: Encoded})` runs the fusion module (None without one)."""
  batch: Mapping[str, Array]
  encoded: Mapping[str, towers.Encoded]     # the towers' outputs for the batch's modalities
  embeddings: Mapping[str, Array]           # [B, D] float32, L2-normalised
  logit_scale: Array
  encode: Callable[[str, Array, Array | None], towers.Encoded]
  fuse: Callable[[Mapping[str, towers.Encoded]], dict[str, Any]] | None
  train: bool


def options(heads_config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """`config.model.heads` with defaults filled in; unknown heads, unknown keys and missing
  modality names fail, naming the key."""
  out = {}
  for name, given in dict(heads_config).items():
    if name not in OPTIONS:
      raise ValueError(f'config.model.heads.{name}: unknown head; known: {sorted(OPTIONS)}.')
    given = dict(given)
    unknown = sorted(set(given) - set(OPTIONS[name]))
    if unknown:
      raise ValueError(f'config.model.heads.{name} has {unknown}; it takes '
                       f'{sorted(OPTIONS[name])}.')
    merged = {**OPTIONS[name], **given}
    missing = sorted(k for k, v in merged.items() if v is None)
    if missing:
      raise ValueError(f'config.model.heads.{name} needs {missing} (modality names of '
                       'config.model.towers).')
    out[name] = merged
  return out


def modalities(name: str, opts: Mapping[str, Any]) -> dict[str, str]:
  """The modality each of a head's modality keys names, e.g. {'pair[0]': ..., 'context': ...}."""
  keys = {'classification': ('input',), 'itm': (), 'mlm': ('modality', 'context'),
          'vqa': ('question', 'context'), 'caption': ('target', 'context')}[name]
  named = {k: opts[k] for k in keys}
  if name == 'itm':
    pair = tuple(opts['pair'])
    if len(pair) != 2 or pair[0] == pair[1]:
      raise ValueError(f'config.model.heads.itm.pair = {pair!r}: needs two different modalities.')
    named = {'pair[0]': pair[0], 'pair[1]': pair[1]}
  return named


def mask_tokens_for(heads_options: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
  """Extra token ids each modality's tower needs: MLM's [MASK], one past the vocabulary."""
  mlm = heads_options.get('mlm')
  return {mlm['modality']: 1} if mlm else {}


# -------------------------------------------------------------------------------- heads


class ClassificationHead(nn.Module):
  """logits [B, num_classes] float32 from `input`'s pooled vector. Zero-init: a fresh
  fine-tuning head starts from uniform predictions."""
  num_classes: int
  input: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, forward: Forward) -> dict[str, Array] | None:
    if self.input not in forward.encoded:
      return None
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.named_init(nn.initializers.zeros, ('embed', 'classes')),
        bias_init=layers.named_init(nn.initializers.zeros, ('classes',)), name='dense')(
            forward.encoded[self.input].pooled)
    return {'logits': logits.astype(jnp.float32)}


class ITMHead(nn.Module):
  """Image-text matching, for any pair (a, b): {'logits' [N, 2], 'labels' [N]} of the fused
  pairs. In evaluation the positives (N = B); in training also, for each a, one hard negative
  b and, for each b, one hard negative a, drawn in proportion to softmax(similarity) over the
  others (never the positive), N = 3B."""
  pair: tuple[str, str]
  classifier: fusion_lib.Classifier

  def __call__(self, forward: Forward) -> dict[str, Array] | None:
    a, b = self.pair
    if a not in forward.encoded or b not in forward.encoded:
      return None
    enc_a, enc_b = forward.encoded[a], forward.encoded[b]
    batch = enc_a.tokens.shape[0]
    if forward.train:
      # At the contrastive temperature, as ALBEF: raw cosines in [-1, 1] would make the
      # softmax nearly uniform, and the negatives no harder than random ones.
      sim_bb = forward.logit_scale * forward.embeddings[a] @ forward.embeddings[b].T
      b_for_a, a_for_b = sampling.negatives_for_both(self.make_rng('sample'), sim_bb)
      keep = jnp.arange(batch)
      # Rows: the positives, then each a with its negative b, then each b with its negative a.
      enc_a = jax.tree.map(lambda x: jnp.concatenate([x, x[keep], x[a_for_b]]), enc_a)
      enc_b = jax.tree.map(lambda x: jnp.concatenate([x, x[b_for_a], x[keep]]), enc_b)
    logits = self.logits(forward.fuse({a: enc_a, b: enc_b}))
    labels = (jnp.arange(enc_a.tokens.shape[0]) < batch).astype(jnp.int32)
    return {'logits': logits, 'labels': labels}

  def logits(self, fused: Mapping[str, Any]) -> Array:
    """[N, 2] (no match, match) of fused pairs: what retrieval re-ranks with."""
    return self.classifier(fused)


class MLMHead(nn.Module):
  """Masked language modelling of `modality` (token ids) fused with `context`:
  {'logits' [B,L,V], 'targets' [B,L], 'weights' [B,L]}. In training 15% of the real tokens are
  masked (80% [MASK] = `mask_id`, 10% random, 10% kept) and weigh 1; in evaluation nothing is
  masked or scored."""
  modality: str
  context: str
  vocab_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.vocab = nn.Dense(
        self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.named_init(nn.initializers.xavier_uniform(), ('embed', 'vocab')),
        bias_init=layers.named_init(nn.initializers.zeros, ('vocab',)))

  @property
  def mask_id(self) -> int:
    return self.vocab_size       # one past the vocabulary: the tower has a row for it

  def __call__(self, forward: Forward) -> dict[str, Array] | None:
    m, c = self.modality, self.context
    if m not in forward.encoded or c not in forward.encoded:
      return None
    ids_bl, mask_bl = forward.batch[m], forward.batch[f'{m}_mask']
    if forward.train:
      inputs_bl, targets_bl, weights_bl = sampling.mask_tokens(
          self.make_rng('mask'), ids_bl, mask_bl, mask_id=self.mask_id, vocab_size=self.mask_id)
    else:
      inputs_bl, targets_bl, weights_bl = ids_bl, ids_bl, jnp.zeros(ids_bl.shape, jnp.float32)
    fused = forward.fuse({m: forward.encode(m, inputs_bl, mask_bl), c: forward.encoded[c]})
    if m not in fused['tokens_by_modality']:
      raise ValueError(f'MLM predicts the tokens of {m!r}, but the fusion strategy gives no '
                       'per-token outputs for it.')
    logits_blv = self.vocab(fused['tokens_by_modality'][m])
    return {'logits': logits_blv.astype(jnp.float32), 'targets': targets_bl,
            'weights': weights_bl}


class VQAHead(nn.Module):
  """Answers as classes: the batch's `question` (with `question_mask`) through the `question`
  modality's tower, fused with `context` -> {'logits' [B, answers]}."""
  question: str
  context: str
  classifier: fusion_lib.Classifier

  def __call__(self, forward: Forward) -> dict[str, Array] | None:
    if 'question' not in forward.batch or self.context not in forward.encoded:
      return None
    if 'question_mask' not in forward.batch:
      raise ValueError("batch has 'question' but no 'question_mask'")
    asked = forward.encode(self.question, forward.batch['question'],
                           forward.batch['question_mask'])
    return {'logits': self.logits(forward.fuse({self.question: asked,
                                                self.context: forward.encoded[self.context]}))}

  def logits(self, fused: Mapping[str, Any]) -> Array:
    return self.classifier(fused)


class CaptionHead(nn.Module):
  """The `target` token modality teacher-forced (BOS + target[:-1]) through a causal decoder that
  cross-attends to `context`'s tokens: {'logits' [B,L,V], 'targets' [B,L], 'weights' [B,L]}."""
  target: str
  context: str
  decoder: decoder_lib.TextDecoder

  def __call__(self, forward: Forward) -> dict[str, Array] | None:
    if self.target not in forward.batch or self.context not in forward.encoded:
      return None
    ids_bl = forward.batch[self.target]
    inputs_bl = jnp.concatenate(
        [jnp.full((ids_bl.shape[0], 1), BOS_ID, ids_bl.dtype), ids_bl[:, :-1]], axis=1)
    context = forward.encoded[self.context]
    logits = self.decoder(inputs_bl, context.tokens, context.mask, train=forward.train)
    return {'logits': logits, 'targets': ids_bl,
            'weights': forward.batch[f'{self.target}_mask'].astype(jnp.float32)}


# ------------------------------------------------------------------------------- building


def build(name: str, opts: Mapping[str, Any], context: towers.BuildContext,
          fusion: fusion_lib.Fusion | None) -> nn.Module:
  """The head module for `config.model.heads.<name>` (options from `options`). `context.vocab_size`
  is the tokenizer's (without MLM's [MASK])."""
  if name in FUSED and fusion is None:
    raise ValueError(f'config.model.heads.{name} runs on fused features, but '
                     'config.model.fusion.strategy is empty; set it to one of '
                     f'{fusion_lib.STRATEGIES}.')
  dtypes = dict(dtype=context.dtype, param_dtype=context.param_dtype)
  try:
    if name == 'classification':
      if opts['num_classes'] <= 0:
        raise ValueError(f"num_classes={opts['num_classes']}: must be positive (-1 is resolved "
                         'from the dataset by the trainer)')
      return ClassificationHead(opts['num_classes'], opts['input'], **dtypes)
    if name == 'itm':
      return ITMHead(tuple(opts['pair']), fusion_lib.classifier(fusion, 2))
    if name == 'mlm':
      return MLMHead(opts['modality'], opts['context'], context.vocab_size, **dtypes)
    if name == 'vqa':
      if opts['answers'] <= 0:
        raise ValueError(f"answers={opts['answers']}: must be positive (-1 is resolved from the "
                         'dataset by the trainer)')
      return VQAHead(opts['question'], opts['context'], fusion_lib.classifier(fusion, opts['answers']))
    decoder = decoder_lib.TextDecoder(vocab_size=context.vocab_size, max_len=opts['max_len'],
                                      stack=context.stack(opts).replace(remat='none',
                                                                        scan_layers=False))
    return CaptionHead(opts['target'], opts['context'], decoder)
  except ValueError as e:
    raise ValueError(f'config.model.heads.{name}: {e}') from e
