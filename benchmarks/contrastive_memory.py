r"""Per-device memory of the sharded contrastive losses against the global batch size.

  python -m benchmarks.contrastive_memory [--batches 1024,2048,...,65536] [--dim 512] \
      [--chunk_size 256] [--devices 8] [--losses ring,dense,softmax] [--no_record] \
      [--results_md PATH] [--json_out PATH]

Owns lowering and compiling value_and_grad (w.r.t. both embeddings, logit scale and bias) of
each loss from abstract inputs, the batch sharded over a data=devices mesh as the trainer
shards it, and reading XLA's memory plan for one device (`environment.compiled_memory`):
nothing runs, so batches far beyond the machine's memory can be planned. The losses:
  ring:    sigmoid_contrastive(impl='ring'): chunked ring of ppermutes, O(b D + b chunk).
  dense:   sigmoid_contrastive(impl='dense'): B x B logits, partitioned by XLA, O(b B).
  softmax: softmax_contrastive: all-gathered rows, b x B logits per device, O(b B).
(B global batch, b = B / devices.) Growth is each row's memory over the one at the previous
batch of the sweep: 2x per doubling is linear in B, 4x quadratic.

Without an accelerator the devices are host CPUs: the device count is fixed when jax starts,
so XLA_FLAGS gets --xla_force_host_platform_device_count=8 before jax is imported.
"""
from __future__ import annotations

import os
import sys
from typing import Any

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_force_host_platform_device_count=8').strip()

from benchmarks import environment, record  # noqa: E402

LOSSES = {   # name -> (registered objective, its kwargs besides chunk_size)
    'ring': ('sigmoid_contrastive', {'impl': 'ring', 'pairs': (('a', 'b'),)}),
    'dense': ('sigmoid_contrastive', {'impl': 'dense', 'pairs': (('a', 'b'),)}),
    'softmax': ('softmax_contrastive', {'pairs': (('a', 'b'),)}),
}
COLUMNS = ('Date (UTC)', 'Machine', 'Commit', 'Loss', 'Global batch', 'Devices', 'D', 'Chunk',
           'Temp MiB/device', 'Total MiB/device', 'Temp growth', 'Total growth')
_INTRO = ('`python -m benchmarks.contrastive_memory`: XLA\'s memory plan for one device of '
          'value_and_grad of each contrastive loss (w.r.t. both embeddings, scale and bias), '
          'float32, the global batch sharded over `Devices` devices (b = batch / devices rows '
          'each); nothing is run. ring: the chunked sigmoid ring (`sigmoid_contrastive`, '
          'impl=ring; `Chunk`: the columns scored at once, the largest divisor of b <= '
          '--chunk_size); dense: the same loss with the B x B logits (impl=dense), partitioned '
          'by XLA; softmax: `softmax_contrastive` (all-gathered, b x B logits). Total = '
          'arguments + outputs + temporaries. Growth: memory over the row above, the previous '
          'batch of the sweep (half this one by default): ~2x is linear in the global batch, '
          '~4x quadratic.')


def _devices(count: int):
  import jax
  for devices in (jax.devices(), jax.devices('cpu')):
    if len(devices) >= count:
      return devices[:count]
  raise ValueError(f'--devices={count}: only {len(jax.devices("cpu"))} CPU devices; run with '
                   f'XLA_FLAGS=--xla_force_host_platform_device_count={count}.')


def plan(loss: str, batch: int, dim: int, chunk_size: int, devices) -> dict[str, int] | None:
  """XLA's per-device memory plan (environment.compiled_memory) of the loss step."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from mmfusion import objectives

  name, kwargs = LOSSES[loss]
  if name == 'sigmoid_contrastive':
    kwargs = dict(kwargs, chunk_size=chunk_size)

  def loss_fn(za, zb, scale, bias):
    outputs = {'embeddings': {'a': za, 'b': zb}, 'logit_scale': scale,
               'logit_bias': bias}
    return objectives.REGISTRY[name].fn(outputs, {}, **kwargs)

  mesh = jax.make_mesh((len(devices), 1, 1), ('data', 'fsdp', 'tensor'),
                       axis_types=(AxisType.Auto,) * 3, devices=devices)
  embeddings = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                                    sharding=NamedSharding(mesh, P(('data', 'fsdp'))))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))
  # As the trainer calls the loss: under the mesh and the rule that shards 'batch'.
  with jax.set_mesh(mesh), nn.logical_axis_rules([('batch', ('data', 'fsdp'))]):
    compiled = step.lower(embeddings, embeddings, scalar, scalar).compile()
  return environment.compiled_memory(compiled)


def sweep(batches: list[int], dim: int, chunk_size: int, num_devices: int,
          losses: list[str]) -> dict[str, Any]:
  unknown = set(losses) - set(LOSSES)
  if unknown or not losses:
    raise ValueError(f'--losses={",".join(losses)}: losses are {",".join(LOSSES)}.')
  if sorted(set(batches)) != batches or any(b % num_devices for b in batches):
    raise ValueError(f'--batches={batches}: give increasing batch sizes, each a multiple of '
                     f'--devices={num_devices}.')
  from mmfusion import objectives
  devices = _devices(num_devices)
  rows = []
  for loss in losses:
    previous = None
    for batch in batches:
      memory = plan(loss, batch, dim, chunk_size, devices)
      if memory is None:
        raise RuntimeError(f'XLA gives no memory analysis on {devices[0].platform}.')
      local = batch // num_devices
      row = {'loss': loss, 'batch': batch, 'local_batch': local, 'memory': memory,
             'chunk': objectives.ring_chunk(local, chunk_size) if loss == 'ring' else None}
      for key in ('temp', 'total'):
        row[f'{key}_growth'] = (None if previous is None
                                else memory[key] / max(previous['memory'][key], 1))
      rows.append(row)
      previous = row
      print(f"  {loss:>8} B={batch:>6}: temp {memory['temp'] / 2**20:10.2f} MiB, total "
            f"{memory['total'] / 2**20:10.2f} MiB per device", flush=True)
  first = devices[0]
  machine = dict(environment.device_description(), platform=first.platform,
                 device_kind=first.device_kind, device_count=num_devices)
  return {'dim': dim, 'chunk_size': chunk_size, 'devices': num_devices, 'batches': batches,
          'dtype': 'float32', 'machine': environment.describe(machine), 'results': rows}


def _mib(n: int) -> str:
  return f'{n / 2**20:.2f}'


def _growth(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.2f}x'


def _report(result: dict[str, Any]) -> str:
  lines = [f"contrastive loss memory per device: {result['machine']}, commit {result['commit']}, "
           f"D={result['dim']}, chunk_size={result['chunk_size']}, float32",
           f"{'loss':>8} {'batch':>7} {'chunk':>6} {'temp MiB':>10} {'total MiB':>10} "
           f"{'temp growth':>12} {'total growth':>13}"]
  for r in result['results']:
    lines.append(f"{r['loss']:>8} {r['batch']:>7} {r['chunk'] or '-':>6} "
                 f"{_mib(r['memory']['temp']):>10} {_mib(r['memory']['total']):>10} "
                 f"{_growth(r['temp_growth']):>12} {_growth(r['total_growth']):>13}")
  return '\n'.join(lines)


def main(flag_values: Any) -> None:
  if not all(b.strip().isdigit() for b in flag_values.batches):
    sys.exit(f'benchmarks.contrastive_memory: --batches={",".join(flag_values.batches)}: give '
             'whole numbers, e.g. 1024,2048.')
  try:
    batches = [int(b) for b in flag_values.batches]
    result = sweep(batches, flag_values.dim, flag_values.chunk_size, flag_values.devices,
                   list(flag_values.losses))
  except ValueError as e:
    sys.exit(f'benchmarks.contrastive_memory: {e}')
  result.update(commit=environment.git_commit(), date=environment.utc_now())
  print(_report(result), flush=True)
  json_path = flag_values.json_out or record.default_json_path(
      {'date': result['date'], 'config': 'contrastive_memory'})
  print(f'  record: {record.write_json(result, json_path)}')
  if not flag_values.no_record:
    for r in result['results']:
      record.append_row(flag_values.results_md, record.CONTRASTIVE_MEMORY_SECTION, COLUMNS, [
          record.table_date(result['date']), result['machine'], result['commit'], r['loss'],
          r['batch'], result['devices'], result['dim'], r['chunk'] or 'n/a',
          _mib(r['memory']['temp']), _mib(r['memory']['total']), _growth(r['temp_growth']),
          _growth(r['total_growth'])], intro=_INTRO)
    print(f'  recorded in {os.path.relpath(flag_values.results_md)}')


def _define_flags() -> Any:
  # Defined only when run as a program, so that tests can import this module.
  from absl import flags
  flags.DEFINE_list('batches', [str(1024 * 2**i) for i in range(7)],
                    'Global batch sizes, increasing; each a multiple of --devices.')
  flags.DEFINE_integer('dim', 512, 'Embedding width D.')
  flags.DEFINE_integer('chunk_size', 256, "The ring's chunk_size (columns scored at once).")
  flags.DEFINE_integer('devices', 8, 'Devices the batch is sharded over (data axis).')
  flags.DEFINE_list('losses', list(LOSSES), f'Any of {",".join(LOSSES)}.')
  flags.DEFINE_bool('no_record', False, 'Do not append rows to the results file.')
  flags.DEFINE_string('results_md', record.RESULTS_MD, 'The markdown results file.')
  flags.DEFINE_string('json_out', '', 'Where the JSON record goes (default: '
                      'benchmarks/results/<date>_contrastive_memory.json).')
  return flags.FLAGS


if __name__ == '__main__':
  from mmfusion import cli
  FLAGS = _define_flags()
  cli.run(lambda: main(FLAGS), program='benchmarks.contrastive_memory')
