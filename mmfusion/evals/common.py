"""What every evaluator shares: option checking, the jitted predict, and gathering valid rows.

Evaluators stream `pipeline.eval_batches`, run jitted forward passes, and gather per-example
outputs to the host with `gather_valid`; the scoring itself is numpy (`metrics.py`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Params = Any          # a pytree of arrays, as `model.apply({'params': params}, ...)` takes it
Batch = dict[str, np.ndarray]


def to_plain(value: Any) -> Any:
  """ConfigDict (possibly nested) -> plain dict; anything else unchanged."""
  return value.to_dict() if hasattr(value, 'to_dict') else value


class Evaluator:
  """Options shared by every type, option checking, and the batches of the split.

  Subclasses extend OPTIONS (name -> default) and implement `run(params)`, which yields
  (metric_name, float) pairs. Every option is checked in __init__, so a bad entry in
  `config.evals` fails when the evaluator is built, before any compute.
  """
  TYPE = ''            # the `type=` that selects this class in config.evals
  OPTIONS: dict[str, Any] = dict(split='test', batch_size=256, keep_if=None)

  def __init__(self, name: str, *, model: Any, config: Any, tokenizer: Any, **options: Any):
    self.name = name
    self.model = model
    self.config = config
    self.tokenizer = tokenizer
    unknown = sorted(set(options) - set(self.OPTIONS))
    if unknown:
      raise self.error(f'unknown key(s) {unknown} for type {self.TYPE!r}; it accepts '
                       f'type, every, {", ".join(sorted(self.OPTIONS))}.')
    options = {**self.OPTIONS, **{k: to_plain(v) for k, v in options.items()}}
    self.options = options

    self.split = options['split']
    if not isinstance(self.split, str) or not self.split:
      raise self.error(f'split must be a non-empty string, got {self.split!r}.')
    self.batch_size = check_positive_int(self, 'batch_size', options['batch_size'])
    keep_if = options['keep_if']
    if keep_if is not None and not isinstance(keep_if, Mapping):
      raise self.error(f'keep_if must be a dict (feature -> value) or None, got {keep_if!r}.')
    # An empty filter means "keep everything"; the pipeline gets None for it.
    self.keep_if = dict(keep_if) if keep_if else None

  def error(self, message: str) -> ValueError:
    return ValueError(f'config.evals.{self.name}: {message}')

  def batches(self) -> Iterator[Batch]:
    # Imported here, not at module level: the pipeline pulls in TensorFlow, which neither
    # building an evaluator nor importing mmfusion.evals should pay for.
    from mmfusion.data import pipeline
    return pipeline.eval_batches(self.config, self.split, self.tokenizer, self.batch_size,
                                 keep_if=self.keep_if)

  def class_names(self) -> list[str]:
    from mmfusion.data import pipeline
    return list(pipeline.class_names(self.config))

  def run(self, params: Params) -> Iterator[tuple[str, float]]:
    raise NotImplementedError


def check_positive_int(evaluator: Evaluator, key: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise evaluator.error(f'{key} must be a positive int, got {value!r}.')
  return int(value)


def make_predict(model: Any, select: Callable[[dict[str, Any]], Any]
                 ) -> Callable[[Params, Batch], Any]:
  """jit(params, batch -> select(model.apply(...))) in inference mode.

  `select` picks the outputs the evaluator needs inside the jit, so XLA drops whatever else
  the model would compute and nothing unused is copied back to the host.
  """
  def predict(params: Params, batch: Batch) -> Any:
    return select(model.apply({'params': params}, batch, train=False))
  return jax.jit(predict)


def collect(batches: Iterable[Batch], fn: Callable[[Batch], dict[str, Any]],
            ) -> dict[str, np.ndarray]:
  """Runs fn on every batch and returns its outputs for the real (`_valid`) rows only.

  fn returns a dict of arrays whose leading axis is the batch (device or numpy arrays).
  Device outputs are left on device until the end so dispatch runs ahead of the host.
  """
  outputs, valid = [], []
  for batch in batches:
    if '_valid' not in batch:
      raise ValueError(f'eval batch has no "_valid" key (keys: {sorted(batch)}).')
    outputs.append(fn(batch))
    valid.append(np.asarray(batch['_valid'], np.bool_))
  return gather_valid(outputs, valid)


def gather_valid(outputs: Sequence[dict[str, Any]], valid: Sequence[np.ndarray]
                 ) -> dict[str, np.ndarray]:
  """Per-batch outputs -> whole-split host arrays, dropping padding rows.

  Single host: a concatenation. Multi-host goes here and only here: each host sees its own
  shard of the split, padded so that every host runs the same number of batches; all-gather
  the padded arrays *and* the masks across processes (e.g. with
  `jax.experimental.multihost_utils.process_allgather`) before masking, so every host ends
  with the same rows in the same order.
  """
  if not outputs:
    return {}
  outputs = jax.device_get(list(outputs))
  mask = np.concatenate(valid)
  gathered = {}
  for key in outputs[0]:
    rows = np.concatenate([np.asarray(o[key]) for o in outputs])
    if rows.shape[0] != mask.shape[0]:
      raise ValueError(f'output {key!r} has {rows.shape[0]} rows for {mask.shape[0]} examples.')
    gathered[key] = rows[mask]
  return gathered


def embed_texts(embed: Callable[[Params, Batch], Any], params: Params, ids: np.ndarray,
                mask: np.ndarray, batch_size: int) -> np.ndarray:
  """[N, L] token ids -> [N, D] float32 text embeddings, in batches of one fixed shape.

  The last chunk is padded by repeating its final row (not with empty texts, whose
  fully-masked attention could produce NaN) so a single compilation serves every chunk.
  """
  n = ids.shape[0]
  size = min(batch_size, n)
  chunks = []
  for start in range(0, n, size):
    stop = min(start + size, n)
    pad = ((0, size - (stop - start)), (0, 0))
    chunk_ids = np.pad(ids[start:stop], pad, mode='edge')
    chunk_mask = np.pad(mask[start:stop], pad, mode='edge')
    chunks.append((embed(params, {'text': chunk_ids, 'text_mask': chunk_mask}), stop - start))
  return np.concatenate([np.asarray(jax.device_get(e), np.float32)[:k] for e, k in chunks])


def image_embeddings(out: dict[str, Any]) -> Any:
  return out['embeddings']['image']


def text_embeddings(out: dict[str, Any]) -> Any:
  return out['embeddings']['text']


def check_labels(evaluator: Evaluator, label: np.ndarray, num_classes: int) -> None:
  if label.size and (label.min() < 0 or label.max() >= num_classes):
    raise evaluator.error(f'split {evaluator.split!r} has labels in [{label.min()}, '
                          f'{label.max()}] but there are {num_classes} classes.')


def check_not_empty(evaluator: Evaluator, num_examples: int) -> None:
  if num_examples == 0:
    raise evaluator.error(f'split {evaluator.split!r} gave no examples '
                          f'(keep_if={evaluator.keep_if}).')
