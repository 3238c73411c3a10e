"""Device mesh from config, logical-axis rules, and the shardings of state and batches.

The model names logical axes only; a rule table (a preset, plus overrides from
config.sharding) maps them to the mesh axes ('data', 'fsdp', 'tensor'). With the default mesh
(data=-1, fsdp=1, tensor=1) every preset is plain data parallelism over every device.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmfusion.models import layers

MESH_AXES = ('data', 'fsdp', 'tensor')

# Presets of logical axis -> mesh axes (config.sharding.preset); config.sharding.rules
# overrides single entries. Flax applies a table in order and never uses one mesh axis twice
# in an array, so in an activation [batch, length, embed] 'batch' takes ('data', 'fsdp') and
# 'embed' -> 'fsdp' falls away: FSDP shards parameters and optimizer state, not activations'
# feature dims. A mesh axis of size 1 shards nothing, so 'fsdp_tensor' on a data-only mesh is
# plain data parallelism.
PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Every parameter replicated; the batch split over every data-like axis.
    'data_parallel': (
        ('batch', ('data', 'fsdp')),
    ),
    # ZeRO-3 style: parameters and optimizer state split along their 'embed' dimension (every
    # kernel, embedding and norm has one); gathered per layer inside the step by XLA.
    'fsdp': (
        ('batch', ('data', 'fsdp')),
        ('embed', 'fsdp'),
    ),
    # FSDP plus Megatron-style tensor parallelism: attention heads, MLP hidden units and the
    # vocabulary split over 'tensor' in parameters and activations.
    'fsdp_tensor': (
        ('batch', ('data', 'fsdp')),
        ('embed', 'fsdp'),
        ('mlp', 'tensor'),
        ('heads', 'tensor'),
        ('vocab', 'tensor'),
    ),
}
DEFAULT_PRESET = 'fsdp_tensor'
DEFAULT_RULES = PRESETS[DEFAULT_PRESET]


def _as_axes(value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def make_rules(preset: str = DEFAULT_PRESET, overrides: Sequence[Sequence[Any]] = ()
               ) -> tuple[tuple[str, Any], ...]:
  """The rule table: the preset's entries, each replaced by an override of the same logical
  axis, then the remaining overrides. Unknown logical or mesh axes fail, naming them."""
  if preset not in PRESETS:
    raise ValueError(f'config.sharding.preset = {preset!r}: unknown; presets are {sorted(PRESETS)}.')
  rules = dict(PRESETS[preset])
  for entry in overrides:
    if len(entry) != 2:
      raise ValueError(f'config.sharding.rules entry {tuple(entry)!r}: expected a pair '
                       '(logical axis, mesh axis | tuple of mesh axes | None).')
    logical, mesh_axes = entry
    if logical not in layers.LOGICAL_AXES:
      raise ValueError(f'config.sharding.rules names the logical axis {logical!r}, which the '
                       f'model does not use; logical axes are {layers.LOGICAL_AXES}.')
    unknown = [a for a in _as_axes(mesh_axes) if a not in MESH_AXES]
    if unknown:
      raise ValueError(f'config.sharding.rules maps {logical!r} to mesh axes {unknown}, which '
                       f'the mesh does not have; mesh axes are {MESH_AXES} (or None).')
    rules[logical] = tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes
  return tuple((k, v) for k, v in rules.items())


def logical_axes_of(logical: tuple[str, ...], rules) -> tuple[str, ...]:
  """The mesh axes that the first of `logical` maps to under `rules`, e.g. ('data', 'fsdp')."""
  return _as_axes(nn.logical_to_mesh_axes(logical, list(rules))[0])


def rules_from_config(sharding_config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  return make_rules(sharding_config['preset'], tuple(sharding_config['rules']))


# ------------------------------------------------------------------------------- mesh


def _fill(what: str, mesh_config: Mapping[str, int], num_devices: int,
          unit: str = 'devices') -> list[int]:
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'{what} has unknown axes {sorted(unknown)}; axes are {MESH_AXES}.')
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  shown = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f'{what} {shown}: at most one axis may be -1.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'{what} {shown}: sizes must be >= 1 or -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{what} {shown}: the fixed axes multiply to {known}, which does not '
                       f'divide the {num_devices} {unit}; change the sizes.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'{what} {shown} has {math.prod(sizes)} {unit} but {num_devices} are '
                     'available; set one axis to -1 or change the sizes.')
  return sizes


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int,
               dcn_config: Mapping[str, int] | None = None, num_granules: int = 1
               ) -> tuple[int, ...]:
  """Per-axis sizes of the whole mesh (within-granule x across-granule), -1s filled.

  A granule is a TPU slice or, on GPU/CPU, a process (host). `mesh_config` (config.mesh)
  splits the devices of one granule, `dcn_config` (config.mesh_dcn) the granules; an axis's
  size is the product of both.
  """
  return tuple(i * d for i, d in zip(*_split_shape(mesh_config, num_devices, dcn_config,
                                                   num_granules)))


def _split_shape(mesh_config, num_devices, dcn_config, num_granules):
  dcn_config = {a: int(v) for a, v in dict(dcn_config or {}).items()}
  if all(v == 1 for v in dcn_config.values()):   # no across-granule split: one flat mesh
    return _fill('config.mesh', mesh_config, num_devices), [1] * len(MESH_AXES)
  dcn = _fill('config.mesh_dcn', dcn_config, num_granules,
              'granules (TPU slices, or processes on GPU/CPU)')
  return _fill('config.mesh', mesh_config, num_devices // num_granules), dcn


def granules(devices: Sequence[jax.Device] | None = None) -> tuple[int, bool]:
  """(number of granules, whether a granule is a process rather than a TPU slice)."""
  devices = list(devices if devices is not None else jax.devices())
  if devices[0].platform == 'tpu' and all(
      getattr(d, 'slice_index', None) is not None for d in devices):
    return len({d.slice_index for d in devices}), False
  return len({d.process_index for d in devices}), True


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_config: Mapping[str, int] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh; with `dcn_config`, a hybrid mesh whose across-granule
  factors (multi-slice TPU, multi-node GPU) sit on the slow network and the within-granule
  factors on the fast one, so that collectives of inner axes never leave a slice or node."""
  devices = list(devices if devices is not None else jax.devices())
  num_granules, process_is_granule = granules(devices)
  ici, dcn = _split_shape(mesh_config, len(devices), dcn_config, num_granules)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(tuple(ici), MESH_AXES, axis_types=axis_types, devices=devices)
  device_array = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=process_is_granule)
  return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split as the rules map the logical 'batch' axis; other axes
  replicated (valid for arrays of any rank)."""
  spec = nn.logical_to_mesh_axes(('batch',), list(rules))
  return NamedSharding(mesh, P(spec[0] if len(spec) else None))


def current_batch_axes() -> tuple[str, ...]:
  """Mesh axes (of size > 1) that the logical 'batch' axis maps to, under the context mesh
  (`jax.set_mesh`) and the active logical-axis rules (`nn.logical_axis_rules`); () outside
  them. Losses that must see the global batch (sharded contrastive losses) ask this."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  spec = nn.logical_to_mesh_axes(('batch',))
  axes = spec[0] if spec and spec[0] is not None else ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if mesh.shape[a] > 1)


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch is split: the product of the mesh axes 'batch' maps to."""
  return math.prod(mesh.shape[a] for a in logical_axes_of(('batch',), rules))


def logical_to_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
  """Tree of logical PartitionSpecs -> tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def fit_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Each sharding with the mesh axes dropped from dimensions they do not divide (e.g. a
  width-100 'embed' over fsdp=8): that dimension stays whole, the rest keeps its split, and
  `replication_report` counts what stays replicated."""
  def fit(leaf, s: NamedSharding) -> NamedSharding:
    spec = list(s.spec) + [None] * (len(leaf.shape) - len(s.spec))
    for dim, entry in enumerate(spec):
      kept = []
      for axis in _as_axes(entry):
        if leaf.shape[dim] % (math.prod(s.mesh.shape[a] for a in kept) * s.mesh.shape[axis]) == 0:
          kept.append(axis)
      spec[dim] = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
    return NamedSharding(s.mesh, P(*spec))
  return jax.tree.map(fit, abstract_tree, shardings)


def _bytes(leaf) -> int:
  return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _bytes_per_device(leaf, s: NamedSharding) -> int:
  return math.prod(s.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize


def state_memory(abstract_state: Any, shardings: Any, min_bytes: int = 0) -> dict[str, Any]:
  """Bytes of params and optimizer state, in total and on each device, and which parameters
  (of at least `min_bytes`) are not split over 'fsdp' (every fsdp shard holds a full copy).

  `abstract_state` / `shardings`: TrainState-like trees with .params and .opt_state.
  """
  def total(tree, shards, per_device):
    fn = _bytes_per_device if per_device else (lambda leaf, s: _bytes(leaf))
    return sum(jax.tree.leaves(jax.tree.map(fn, tree, shards)))

  params, param_shardings = abstract_state.params, shardings.params
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree.leaves(param_shardings)
  not_fsdp = [(jax.tree_util.keystr(path), _bytes(leaf)) for (path, leaf), s in
              zip(flat, flat_shardings)
              if 'fsdp' not in {a for e in s.spec for a in _as_axes(e)} and _bytes(leaf) >= min_bytes]
  param_bytes = total(params, param_shardings, False)
  return {
      'num_params': sum(math.prod(l.shape) for l in jax.tree.leaves(params)),
      'param_bytes': param_bytes,
      'param_bytes_per_device': total(params, param_shardings, True),
      'opt_bytes': total(abstract_state.opt_state, shardings.opt_state, False),
      'opt_bytes_per_device': total(abstract_state.opt_state, shardings.opt_state, True),
      'not_fsdp': sorted(not_fsdp, key=lambda x: -x[1]),
      'not_fsdp_fraction': sum(b for _, b in not_fsdp) / max(param_bytes, 1),
  }


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


def replication_error(memory: Mapping[str, Any], mesh: Mesh, max_fraction: float) -> str | None:
  """Why an FSDP layout keeps too much of the model whole on every fsdp shard, or None.

  `memory` is `state_memory(...)`; only meshes with fsdp > 1 are judged.
  """
  if mesh.shape['fsdp'] == 1 or memory['not_fsdp_fraction'] <= max_fraction:
    return None
  biggest = ', '.join(f'{p} ({b / 2**20:.2f} MiB)' for p, b in memory['not_fsdp'][:5])
  return (f"{memory['not_fsdp_fraction']:.1%} of the parameter bytes are not split over 'fsdp' "
          f'(limit config.sharding.max_replicated_fraction = {max_fraction:.1%}); largest: '
          f'{biggest}. Map a dimension of these to fsdp in config.sharding.rules, make it '
          'divisible by the fsdp size, or set config.sharding.allow_replicated=True.')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree):
  """A tree of (possibly sharded, possibly multi-host) arrays -> the whole arrays as numpy on
  every process. Across hosts this is a collective: every process must call it."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def host_to_global(tree: Any, sharding: NamedSharding) -> Any:
  """Process-local numpy batches -> global arrays whose leading axis is the concatenation of
  every process's rows, split by `sharding` (e.g. `batch_sharding`); a spec longer than an
  array's rank is cut to it, so one sharding serves entries of every rank."""
  def put(x):
    fitted = NamedSharding(sharding.mesh, P(*sharding.spec[:np.ndim(x)]))
    return jax.make_array_from_process_local_data(fitted, x)
  return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values that are the same on every process -> global arrays replicated on `mesh`."""
  return put_global(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def put_global(tree: Any, shardings: Any) -> Any:
  """Host numpy values, identical on every process, -> global arrays in `shardings`; each
  process only copies the shards its own devices hold."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(
      np.shape(x), s, lambda idx: np.asarray(x)[idx]), tree, shardings)
