"""Device mesh from config, logical-axis rules, and the shardings of state and batches.

The model names logical axes only; the table here maps them to mesh axes. With the default
mesh (data=-1, fsdp=1, tensor=1) this is plain data parallelism over every device.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axes. Batch spreads over every data-like axis; the rest of the
# model stays replicated except the dimensions tensor parallelism splits.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', None),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('classes', None),
    ('layers', None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Per-axis sizes with at most one -1 filled so the product is `num_devices`."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}.')
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1 or -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to '
                       f'{known}, which does not divide the {num_devices} devices.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices '
                     f'but {num_devices} are available; set one axis to -1 or change the sizes.')
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-like mesh axes; other axes replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def logical_to_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
  """Tree of logical PartitionSpecs -> tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def opt_state_specs(abstract_opt_state: Any, param_specs: Any) -> Any:
  """Logical specs of the optimizer state: a leaf whose key path ends with a parameter's
  path (Adam's mu/nu, under any optax wrapper) inherits that parameter's spec."""
  by_path = {tuple(path): spec for path, spec in jax.tree_util.tree_flatten_with_path(
      param_specs, is_leaf=lambda x: isinstance(x, P))[0]}

  def spec_for(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      spec = by_path.get(path[start:])
      if spec is not None and len(spec) == leaf.ndim:
        return spec
    return P()
  return jax.tree_util.tree_map_with_path(spec_for, abstract_opt_state)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree):
  """Fetches a (possibly sharded) tree of arrays to host numpy."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
