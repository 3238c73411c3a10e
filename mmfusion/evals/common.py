"""What every evaluator shares: option checking, the jitted predict on the training mesh, and
gathering valid rows from every host.

Evaluators stream `data.evaluation.batches` of the inputs they need (each process reads its own
part of the split, padded so every process runs the same number of batches), assemble global
batches on the mesh, run jitted forward passes under the run's sharding rules, and gather the
outputs of every process to every host (`collect`); the scoring itself is numpy (`metrics.py`).
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
REQUIRED = object()   # an option without a default (OPTIONS)


def to_plain(value: Any) -> Any:
  """ConfigDict (possibly nested) -> plain dict; anything else unchanged."""
  return value.to_dict() if hasattr(value, 'to_dict') else value


class Evaluator:
  """Options shared by every type, option checking, and the batches of the split.

  Subclasses extend OPTIONS (name -> default; REQUIRED marks the ones a config must give) and
  implement `run(params)`, which yields (metric_name, float) pairs, and `inputs()`, the input
  ops their batches need. Options are checked by the classmethod `check_options` (which
  config.validate calls before anything runs) and again when the evaluator is built.
  """
  TYPE = ''            # the `type=` that selects this class in config.evals
  READS_LABELS = False   # scores against the dataset's ClassLabel `label` (config.resolve)
  OPTIONS: dict[str, Any] = dict(split='test', batch_size=256, keep_if=None)

  def __init__(self, name: str, *, model: Any, config: Any, source: Any,
               mesh: jax.sharding.Mesh | None = None, rules: Any = None, **options: Any):
    self.name = name
    self.model = model
    self.config = config
    self.source = source          # data.sources.Source: the dataset, its tokenizer and ops
    # The run's mesh and rules: params arrive sharded as the trainer holds them, and the
    # forward pass runs with the same activation shardings. Alone (a notebook): every device.
    self.mesh = mesh if mesh is not None else sharding.make_mesh({'data': -1})
    self.rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.options = options = self.check_options(name, options, config)
    self.split = options['split']
    self.batch_size = options['batch_size']
    self.host_batch_size = host_batch_size(
        self.batch_size, sharding.data_parallel_size(self.mesh, self.rules), jax.process_count())
    # An empty filter means "keep everything"; the pipeline gets None for it.
    self.keep_if = dict(options['keep_if']) if options['keep_if'] else None

  @classmethod
  def check_options(cls, name: str, options: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """`options` with defaults filled in; an unknown or bad one fails, naming the key."""
    error = lambda message: ValueError(f'config.evals.{name}: {message}')
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
      raise error(f'unknown key(s) {unknown} for type {cls.TYPE!r}; it accepts type, every, '
                  f'{", ".join(sorted(cls.OPTIONS))}.')
    options = {**cls.OPTIONS, **{k: to_plain(v) for k, v in options.items()}}
    missing = sorted(k for k, v in options.items() if v is REQUIRED)
    if missing:
      raise error(f'type {cls.TYPE!r} needs {missing} (modality names of config.model.towers: '
                  f'{sorted(config.model.towers)}).')
    if not isinstance(options['split'], str) or not options['split']:
      raise error(f"split must be a non-empty string, got {options['split']!r}.")
    options['batch_size'] = check_positive_int(name, 'batch_size', options['batch_size'])
    keep_if = options['keep_if']
    if keep_if is not None and not isinstance(keep_if, Mapping):
      raise error(f'keep_if must be a dict (feature -> value) or None, got {keep_if!r}.')
    return options

  @classmethod
  def check_modality(cls, name: str, key: str, modality: Any, config: Any) -> str:
    if not isinstance(modality, str) or modality not in config.model.towers:
      raise ValueError(f'config.evals.{name}.{key} = {modality!r}: no such tower in '
                       f'config.model.towers (it has {sorted(config.model.towers)}).')
    return modality

  def inputs(self) -> tuple[str, ...]:
    """The input ops whose evaluation entries the batches carry."""
    raise NotImplementedError

  def error(self, message: str) -> ValueError:
    return ValueError(f'config.evals.{self.name}: {message}')

  def check_split(self) -> int:
    """The number of examples of the split, or one clear error if the dataset has no such split
    or keep_if names no feature of it (checked when a run is set up, not after training)."""
    try:
      num = self.source.num_examples(self.split)
    except (KeyError, ValueError) as e:
      raise self.error(f'split {self.split!r}: {str(e).splitlines()[0]} (dataset '
                       f'{self.source.where}).') from None
    if self.keep_if:
      try:
        self.source.keep_if(self.keep_if)
      except ValueError as e:
        raise self.error(str(e)) from None
    return num

  def batches(self) -> Iterator[Batch]:
    # Imported here, not at module level: the data side pulls in TensorFlow, which neither
    # building an evaluator nor importing mmfusion.evals should pay for.
    from mmfusion.data import evaluation
    return evaluation.batches(self.source, self.split, self.inputs(), self.host_batch_size,
                              keep_if=self.keep_if)

  def raw_inputs(self, op_name: str, values: Any) -> dict[str, np.ndarray]:
    """Plain values (e.g. prompt strings) -> batch entries, with the pipeline's own op."""
    return self.source.op(op_name).from_raw(values)

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


def require_head(name: str, config: Any, head: str, what: str) -> None:
  """Fails unless the model has `config.model.heads.<head>`, which evaluator `name` reads."""
  if head not in config.model.heads:
    raise ValueError(f'config.evals.{name}: it needs {what}: set config.model.heads.{head}.')


def check_positive_int(name: str, key: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'config.evals.{name}: {key} must be a positive int, got {value!r}.')
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


def embed_inputs(evaluator: Evaluator, embed: Callable[[Params, Batch], Any], params: Params,
                 inputs: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
  """Batch entries with N rows, the same on every process (e.g. tokenized prompts) -> [N, D]
  float32 embeddings, in batches of one fixed shape, replicated on the evaluator's mesh.

  The last chunk is padded by repeating its final row (not with empty inputs, whose
  fully-masked attention could produce NaN) so a single compilation serves every chunk.
  """
  n = len(next(iter(inputs.values())))
  size = min(batch_size, n)
  chunks = []
  for start in range(0, n, size):
    stop = min(start + size, n)
    chunk = {k: np.pad(v[start:stop], [(0, size - (stop - start))] + [(0, 0)] * (v.ndim - 1),
                       mode='edge') for k, v in inputs.items()}
    chunks.append((embed(params, evaluator.replicate(chunk)), stop - start))
  return np.concatenate([np.asarray(e, np.float32)[:k] for e, k in
                         zip(sharding.to_host([e for e, _ in chunks]), [k for _, k in chunks])])


def modality_entries(batch: Mapping[str, Any], modality: str) -> dict[str, Any]:
  """A modality's entries of a batch: `<m>` and, where it has one, `<m>_mask`."""
  return {k: batch[k] for k in (modality, f'{modality}_mask') if k in batch}


def check_labels(evaluator: Evaluator, label: np.ndarray, num_classes: int) -> None:
  if label.size and (label.min() < 0 or label.max() >= num_classes):
    raise evaluator.error(f'split {evaluator.split!r} has labels in [{label.min()}, '
                          f'{label.max()}] but there are {num_classes} classes.')


def check_not_empty(evaluator: Evaluator, num_examples: int) -> None:
  if num_examples == 0:
    raise evaluator.error(f'split {evaluator.split!r} gave no examples '
                          f'(keep_if={evaluator.keep_if}).')
