"""mmfusion's side of the benchmark: the trainer's own step (`train.TrainProgram`) compiled ahead
of time, timed on a synthetic batch, with its model FLOPs and memory.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from benchmarks import environment
from benchmarks import flops as flops_lib
from benchmarks import timing
from mmfusion import config as config_lib
from mmfusion import sharding
from mmfusion import train


def flops_reference(config: ml_collections.ConfigDict,
                    program: train.TrainProgram) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config whose lowering XLA counts model FLOPs on, and the changes from `config`.

  Model FLOPs are the maths one step needs: without remat's recomputation, and without work
  whose result no loss reads (which XLA drops from the unrolled step: the towers' last blocks
  compute only the pooled token under CLIP's loss, encoder.Encoder). XLA's cost analysis
  counts a scanned (while-loop) body once instead of once per layer, counts remat's
  recomputation, and gives a fused attention kernel (cuDNN custom call) no FLOPs; so the
  reference is the same config unrolled, without remat, with XLA's attention. None of these
  changes the maths of the step. (A scanned step computes its last blocks whole, as open_clip
  does: work beyond the model FLOPs, which lowers its MFU.)
  """
  changes = {}
  if config.model.scan_layers:
    changes['scan_layers'] = False
  if config.model.remat != 'none':
    changes['remat'] = 'none'
  if any(s.attention_impl not in ('xla', 'explicit') for s in tower_stacks(program)):
    changes['attention'] = 'xla'
  reference = config_with(config, {f'model.{key}': value for key, value in changes.items()})
  return reference, [f'{key}={value}' for key, value in changes.items()]


def tower_stacks(program: train.TrainProgram) -> list[Any]:
  """The StackOptions of the model's transformer towers (towers without one are skipped)."""
  return [t.stack for t in program.model.towers.values() if hasattr(t, 'stack')]


def config_with(config: ml_collections.ConfigDict,
                changes: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `changes` ({'model.remat': 'full', 'batch_size': 64}: dotted
  keys, each of which must exist); `config` itself is left as it was."""
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split('.')
    for name in parents:
      node = node.get(name)
      if not isinstance(node, ml_collections.ConfigDict):
        raise KeyError(f'config has no {key!r} to change')
    if leaf not in node:
      raise KeyError(f'config has no {key!r} to change')
    node[leaf] = value
  config.lock()
  return config


def abstract_batch(program: train.TrainProgram, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype,
                                  sharding=program.batch_sharding)
          for k, v in program.expected_batch.items()}


def model_flops(config: ml_collections.ConfigDict, *, program: train.TrainProgram | None = None,
                lowered: jax.stages.Lowered | None = None) -> tuple[float, str]:
  """(FLOPs of one global training step, where the figure comes from).

  `program` / `lowered` are the step as it runs, reused when it is its own reference;
  otherwise the reference config is lowered (not compiled, not run).
  """
  mesh = sharding.make_mesh(config.mesh)
  program = program or train.TrainProgram(config, config.tokenizer.vocab_size, mesh)
  reference, changes = flops_reference(config, program)
  if not changes and lowered is not None:
    return flops_lib.read_flops(lowered), 'XLA cost analysis of this config'
  if changes:
    program = train.TrainProgram(reference, reference.tokenizer.vocab_size, mesh)
  lowered = program.lower_train_step(program.abstract_state_with_shardings(),
                                     abstract_batch(program, config.batch_size))
  source = 'this config' if not changes else 'this config with ' + ', '.join(changes)
  return flops_lib.read_flops(lowered), f'XLA cost analysis of {source}'


class CompiledStep:
  """The trainer's step compiled for `config` on a synthetic batch, ready to time in blocks
  (`time`), with what was measured while building it (`info`: lower / compile seconds, model
  FLOPs) and the memory it used so far (`memory()`)."""

  def __init__(self, config: ml_collections.ConfigDict, batch_np: dict[str, np.ndarray]):
    config_lib.validate(config, jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
    program = train.TrainProgram(config, config.tokenizer.vocab_size, mesh)
    state = program.init_state(config.seed)
    self._batch = jax.device_put({k: batch_np[k] for k in program.expected_batch},
                                 program.batch_sharding)

    # The AOT-compiled executable is the exact program `train_step` runs; calling it directly
    # avoids compiling the step a second time in jit's own cache.
    start = time.perf_counter()
    lowered = program.lower_train_step(state, self._batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    self._compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    step_flops, flops_source = model_flops(config, program=program, lowered=lowered)
    self._state = state     # donated on the first step
    self.info = {
        'lower_s': lower_s,
        'compile_s': compile_s,
        'flops_per_step': step_flops,
        'flops_source': flops_source,
        # What XLA counts for the program as run; below the model FLOPs under nn.scan (the
        # loop body counted once), above them under remat (recomputation). For transparency.
        'xla_flops_as_run': flops_lib.read_flops(lowered),
    }

  def _step(self):
    self._state, _ = self._compiled(self._state, self._batch)
    return self._state

  def time(self, *, warmup: int, steps: int) -> list[float]:
    return timing.time_steps(self._step, warmup=warmup, steps=steps, sync=jax.block_until_ready)

  def memory(self) -> dict[str, Any]:
    return {
        'device_peak_bytes': environment.device_peak_bytes(),
        'xla': environment.compiled_memory(self._compiled),
        # A high-water mark of the whole process (the peer runs in a process of its own).
        'host_max_rss_bytes': environment.host_max_rss_bytes(),
    }

