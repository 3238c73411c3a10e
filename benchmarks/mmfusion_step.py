"""mmfusion's side of the benchmark: the trainer's own step (`train.TrainProgram`) compiled ahead
of time, timed on a synthetic batch, with its model FLOPs and memory.
"""
from __future__ import annotations

import time
from typing import Any

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

  Model FLOPs are the maths of one step, without remat's recomputation. XLA's cost analysis
  counts a scanned (while-loop) body once instead of once per layer, counts remat's
  recomputation, and gives a fused attention kernel (cuDNN custom call) no FLOPs; so the
  reference is the same config unrolled, without remat, with XLA's attention. None of these
  changes the maths of the step.
  """
  changes = {}
  if config.model.scan_layers:
    changes['scan_layers'] = False
  if config.model.remat != 'none':
    changes['remat'] = 'none'
  stacks = [t.stack for t in program.model.towers.values() if hasattr(t, 'stack')]
  if any(s.attention_impl not in ('xla', 'explicit') for s in stacks):
    changes['attention'] = 'xla'
  reference = ml_collections.ConfigDict(config.to_dict())
  reference.model.update(changes)
  reference.lock()
  return reference, [f'{key}={value}' for key, value in changes.items()]


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


def run(config: ml_collections.ConfigDict, batch_np: dict[str, np.ndarray], *,
        warmup: int, steps: int) -> dict[str, Any]:
  """Builds, compiles and times the training step; returns timings, FLOPs and memory."""
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  program = train.TrainProgram(config, config.tokenizer.vocab_size, mesh)
  state = program.init_state(config.seed)
  batch = jax.device_put({k: batch_np[k] for k in program.expected_batch}, program.batch_sharding)

  # The AOT-compiled executable is the exact program `train_step` runs; calling it directly
  # avoids compiling the step a second time in jit's own cache.
  start = time.perf_counter()
  lowered = program.lower_train_step(state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  step_flops, flops_source = model_flops(config, program=program, lowered=lowered)

  holder = {'state': state}
  del state     # donated on the first step

  def step():
    holder['state'], _ = compiled(holder['state'], batch)
    return holder['state']

  seconds = timing.time_steps(step, warmup=warmup, steps=steps, sync=jax.block_until_ready)
  result = {
      'step_seconds': seconds,
      'median_step_s': timing.median(seconds),
      'lower_s': lower_s,
      'compile_s': compile_s,
      'flops_per_step': step_flops,
      'flops_source': flops_source,
      # What XLA counts for the program as run; below the model FLOPs under nn.scan (the loop
      # body counted once), above them under remat (recomputation). Kept for transparency.
      'xla_flops_as_run': flops_lib.read_flops(lowered),
      'memory': {
          'device_peak_bytes': environment.device_peak_bytes(),
          'xla': environment.compiled_memory(compiled),
          # Before any peer runs in this process; a high-water mark of the whole process.
          'host_max_rss_bytes': environment.host_max_rss_bytes(),
      },
  }
  return result   # the state, batch and executable are freed here, before any peer runs
