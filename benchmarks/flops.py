"""FLOP accounting: what a lowered program costs (XLA's cost analysis) and what the device can do
(a matmul measured in the same run, and the vendor's datasheet peak).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import timing

# Dense (non-sparse) peak FLOP/s per device, by the matmul arithmetic the compute dtype runs
# on. 'tfloat32' is what JAX's default precision gives float32 matmuls on NVIDIA GPUs since
# Ampere (TF32 tensor cores); 'float32' is the non-tensor-core rate. Patterns are matched in
# order, case-insensitively, against `jax.devices()[0].device_kind`, so a more specific one
# ('H100 PCIe', 'v5 lite') comes before the general one ('H100', 'v5').
_H100_SXM = {'bfloat16': 989.4e12, 'float16': 989.4e12, 'tfloat32': 494.7e12, 'float32': 66.9e12}
DATASHEET_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ('H100 PCIe', {'bfloat16': 756.0e12, 'float16': 756.0e12, 'tfloat32': 378.0e12,
                   'float32': 51.2e12}),
    ('H100', _H100_SXM),
    ('H200', _H100_SXM),     # same compute as H100 SXM; only the memory differs
    ('A100', {'bfloat16': 312e12, 'float16': 312e12, 'tfloat32': 156e12, 'float32': 19.5e12}),
    ('v5 lite', {'bfloat16': 197e12}),
    ('v5e', {'bfloat16': 197e12}),
    ('v5p', {'bfloat16': 459e12}),
    ('v5', {'bfloat16': 459e12}),       # v5p reports itself as 'TPU v5'
    ('v6 lite', {'bfloat16': 918e12}),
    ('v6e', {'bfloat16': 918e12}),
    ('v4', {'bfloat16': 275e12}),
)

# Square matmul sizes for the measured peak: big enough to saturate the device, small enough
# to take about a second on a laptop CPU.
MATMUL_SIZE = {'cpu': 2048}
MATMUL_SIZE_ACCELERATOR = 8192


def read_flops(stage: Any) -> float:
  """FLOPs of a `jax.stages.Lowered` or `Compiled` program from XLA's cost analysis.

  A Lowered program is analysed before SPMD partitioning, so its figure is for the whole
  (global) step; a Compiled one is per device. Either counts a while-loop body (nn.scan)
  once, not once per iteration.
  """
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):    # older JAX: one dict per program
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    raise ValueError(f'XLA gave no FLOP count for this {type(stage).__name__} '
                     f'(cost analysis: {analysis!r}).')
  return float(analysis['flops'])


def matmul_arithmetic(compute_dtype: str, platform: str) -> str:
  """The datasheet column a compute dtype runs on: float32 matmuls run as TF32 on GPU and as
  bfloat16 passes on TPU under JAX's default precision; an explicit precision setting is taken
  to mean true float32."""
  if compute_dtype != 'float32' or jax.config.jax_default_matmul_precision is not None:
    return compute_dtype
  return {'gpu': 'tfloat32', 'tpu': 'bfloat16'}.get(platform, 'float32')


def datasheet_peak(device_kind: str, arithmetic: str) -> float | None:
  """Peak FLOP/s of one device from the table above; None where unknown (CPUs, other chips)."""
  for pattern, peaks in DATASHEET_PEAK_FLOPS:
    if pattern.lower() in device_kind.lower():
      return peaks.get(arithmetic)
  return None


def matmul_size(platform: str) -> int:
  return MATMUL_SIZE.get(platform, MATMUL_SIZE_ACCELERATOR)


def measured_matmul_peak(dtype: str, platform: str, *, size: int | None = None,
                         warmup: int | None = None, steps: int | None = None) -> float:
  """FLOP/s of one square `size`x`size` matmul in `dtype` on the first device (median time).

  Measured in the same run as the step, it is what this device and XLA actually reach on the
  most favourable kernel: an MFU against it separates "the model is slow" from "the machine
  is slow or busy".
  """
  size = size or matmul_size(platform)
  on_cpu = platform == 'cpu'
  warmup = warmup if warmup is not None else (1 if on_cpu else 3)
  steps = steps if steps is not None else (5 if on_cpu else 20)
  device = jax.devices()[0]
  key_a, key_b = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.dtype(dtype)), device)
          for k in (key_a, key_b))
  matmul = jax.jit(jnp.matmul)
  seconds = timing.time_steps(lambda: matmul(a, b), warmup=warmup, steps=steps,
                              sync=jax.block_until_ready)
  return 2 * size ** 3 / timing.median(seconds)
