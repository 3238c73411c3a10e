"""What every evaluator shares: option checking, the jitted predict on the training mesh, and
gathering valid rows from every host.

Evaluators stream `pipeline.eval_batches` (each process reads its own part of the split,
padded so every process runs the same number of batches), assemble global batches on the
mesh, run jitted forward passes under the run's sharding rules, and gather the outputs of
every process to every host (`collect`); the scoring itself is numpy (`metrics.py`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmfusion import sharding

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

  def __init__(self, name: str, *, model: Any, config: Any, tokenizer: Any,
               mesh: jax.sharding.Mesh | None = None, rules: Any = None, **options: Any):
    self.name = name
    self.model = model
    self.config = config
    self.tokenizer = tokenizer
    # The run's mesh and rules: params arrive sharded as the trainer holds them, and the
    # forward pass runs with the same activation shardings. Alone (a notebook): every device.
    self.mesh = mesh if mesh is not None else sharding.make_mesh({'data': -1})
    self.rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
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
    self.host_batch_size = host_batch_size(
        self.batch_size, sharding.data_parallel_size(self.mesh, self.rules), jax.process_count())
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
    return pipeline.eval_batches(self.config, self.split, self.tokenizer, self.host_batch_size,
                                 keep_if=self.keep_if)

  def class_names(self) -> list[str]:
    from mmfusion.data import pipeline
    return list(pipeline.class_names(self.config))

  def run(self, params: Params) -> Iterator[tuple[str, float]]:
    raise NotImplementedError

  def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """jax.jit(fn), called on the evaluator's mesh under its logical-axis rules."""
    jitted = jax.jit(fn)

    def call(*args):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return jitted(*args)
    return call

  def predict(self, select: Callable[[dict[str, Any]], Any]) -> Callable[[Params, Batch], Any]:
    """(params, batch) -> select(model outputs) in inference mode, jitted on the mesh.

    `select` picks the outputs the evaluator needs inside the jit, so XLA drops whatever else
    the model would compute and nothing unused is copied back to the host.
    """
    return self.jit(lambda params, batch: select(
        self.model.apply({'params': params}, batch, train=False)))

  def collect(self, fn: Callable[[Batch], dict[str, Any]]) -> dict[str, np.ndarray]:
    """Runs fn on every global batch of the split; its outputs for the real rows, on host.

    Each process's batch becomes its rows of a global batch on the mesh; fn returns a dict of
    arrays with a leading batch axis. Outputs stay on device until the end (dispatch runs
    ahead of the host), then every process's rows are gathered to every process along with
    the `_valid` mask they came with, so the padding of every host is dropped alike.
    """
    outputs = []
    for batch in self.batches():
      if '_valid' not in batch:
        raise ValueError(f'eval batch has no "_valid" key (keys: {sorted(batch)}).')
      global_batch = sharding.host_to_global(batch, self.batch_sharding)
      outputs.append({**fn(global_batch), '_valid': global_batch['_valid']})
    return gather_valid(sharding.to_host(outputs))

  def replicate(self, tree: Any) -> Any:
    """Host values that every process holds alike (e.g. prompts) -> replicated on the mesh."""
    return sharding.replicate(tree, self.mesh)


def check_positive_int(evaluator: Evaluator, key: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise evaluator.error(f'{key} must be a positive int, got {value!r}.')
  return int(value)



def host_batch_size(batch_size: int, data_parallel: int, num_processes: int) -> int:
  """Rows each process reads per eval batch: its share of `batch_size`, rounded up so that
  the global batch splits evenly over the data-parallel devices."""
  multiple = data_parallel // math.gcd(data_parallel, num_processes)
  share = math.ceil(batch_size / num_processes)
  return math.ceil(share / multiple) * multiple


def gather_valid(outputs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-batch host outputs, each with its `_valid` [B] mask -> whole-split arrays of the real
  rows, in batch order."""
  if not outputs:
    return {}
  mask = np.concatenate([np.asarray(o['_valid'], np.bool_) for o in outputs])
  gathered = {}
  for key in outputs[0]:
    if key == '_valid':
      continue
    rows = np.concatenate([np.asarray(o[key]) for o in outputs])
    if rows.shape[0] != mask.shape[0]:
      raise ValueError(f'output {key!r} has {rows.shape[0]} rows for {mask.shape[0]} examples.')
    gathered[key] = rows[mask]
  return gathered


def embed_texts(evaluator: Evaluator, embed: Callable[[Params, Batch], Any], params: Params,
                ids: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
  """[N, L] token ids, the same on every process -> [N, D] float32 text embeddings, in
  batches of one fixed shape, replicated on the evaluator's mesh.

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
    chunk = evaluator.replicate({'text': chunk_ids, 'text_mask': chunk_mask})
    chunks.append((embed(params, chunk), stop - start))
  return np.concatenate([np.asarray(e, np.float32)[:k] for e, k in
                         zip(sharding.to_host([e for e, _ in chunks]), [k for _, k in chunks])])


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
