"""Programs that tests/test_scaleout.py runs in subprocesses with several (simulated) devices or
several processes: `python tests/scaleout_cases.py CASE OUT_DIR [ARGS...]`.

Each case writes what it measured to OUT_DIR as .npz / .json for the test to compare; the
device count comes from the environment (XLA_FLAGS=--xla_force_host_platform_device_count=N),
the processes from launch/local_multiprocess.sh.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmfusion import distributed  # noqa: E402

distributed.initialize()   # from the launcher's environment; a no-op for one process

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mmfusion import checkpoint as ckpt_lib  # noqa: E402
from mmfusion import config as config_lib  # noqa: E402
from mmfusion import sharding  # noqa: E402
from mmfusion import train  # noqa: E402

VOCAB = 64
MESHES = {
    'single': dict(data=1, fsdp=1, tensor=1),
    'data8': dict(data=8, fsdp=1, tensor=1),
    'fsdp8': dict(data=1, fsdp=8, tensor=1),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
}
# Gradient accumulation on a mesh: (mesh, accum_steps); each micro-batch is spread over the
# devices that split the batch.
ACCUMULATED = {
    'data8_accum2': ('data8', 2),
    'data2_fsdp2_tensor2_accum4': ('data2_fsdp2_tensor2', 4),
}


def small_config(mesh: dict[str, int], preset: str = 'fsdp_tensor', batch_size: int = 16,
                 accum_steps: int = 1):
  """A two-tower CLIP small enough for CPU, whose dimensions every mesh above divides."""
  config = config_lib.base()
  config.batch_size = batch_size
  config.accum_steps = accum_steps
  config.data.image_size = 16
  config.tokenizer.max_len = 8
  config.tokenizer.vocab_size = VOCAB
  config.model.embed_dim = 32
  config.model.towers.image.update(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4)
  config.model.towers.text.update(width=32, depth=2, mlp_dim=64, num_heads=4)
  config.model.attention = 'xla'
  config.optim.warmup_steps = 0           # the first step must move the parameters
  config.mesh.update(mesh)
  config.sharding.preset = preset
  config.evals = {}
  return config_lib.lock(config)


def global_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """The same global batch in every process (each then keeps the rows its devices hold)."""
  rng = np.random.default_rng(seed)
  b, s, l = config.batch_size, config.data.image_size, config.tokenizer.max_len
  lengths = rng.integers(2, l + 1, b)
  mask = np.arange(l)[None] < lengths[:, None]
  text = np.where(mask, rng.integers(4, VOCAB, (b, l)), 0)
  text[np.arange(b), lengths - 1] = 3
  return {'image': rng.normal(size=(b, s, s, 3)).astype(np.float32),
          'text': text.astype(np.int32), 'text_mask': mask,
          'label': rng.integers(0, 10, b).astype(np.int32)}


def program_for(config, devices=None) -> train.TrainProgram:
  mesh = sharding.make_mesh(config.mesh, devices=devices, dcn_config=config.mesh_dcn)
  return train.TrainProgram(config, VOCAB, mesh)


def one_step(program: train.TrainProgram, steps: int = 1):
  """Fresh state, `steps` steps on the fixed batch -> (loss per step, host params, state)."""
  batch = global_batch(program.config)
  batch = sharding.put_global(batch, {k: program.batch_sharding for k in batch})
  state = program.init_state(0)
  losses = []
  for _ in range(steps):
    state, metrics = program.train_step(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses), state


def save_params(path: str, losses, params) -> None:
  flat = ckpt_lib.flatten(sharding.to_host(params))
  if jax.process_index() == 0:
    np.savez(path, __loss__=losses, **flat)


# ------------------------------------------------------------------------------ cases


def meshes(out_dir: str) -> None:
  """One step under each mesh of MESHES: loss and parameters, and per-device bytes; then one
  with gradient accumulation under each of ACCUMULATED."""
  report = {}
  for name, mesh in MESHES.items():
    config = small_config(mesh)
    devices = jax.devices()[:1] if name == 'single' else None
    program = program_for(config, devices)
    losses, state = one_step(program)
    save_params(os.path.join(out_dir, f'{name}.npz'), losses, state.params)
    # What each device really holds, from the live arrays, next to the whole tensor.
    report[name] = {
        ckpt_lib._path_str(path): [int(leaf.nbytes), int(leaf.addressable_shards[0].data.nbytes)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  with open(os.path.join(out_dir, 'bytes.json'), 'w') as f:
    json.dump(report, f)
  for name, (mesh, k) in ACCUMULATED.items():
    losses, state = one_step(program_for(small_config(MESHES[mesh], accum_steps=k)))
    save_params(os.path.join(out_dir, f'{name}.npz'), losses, state.params)


def processes(out_dir: str, *mesh_names: str) -> None:
  """Two steps on meshes of every device of every process (a multi-process run or not).

  'hybrid' splits 'data' across processes (config.mesh_dcn, the slow network) and 'fsdp'
  within each (config.mesh): the layout of a multi-node GPU run.
  """
  layouts = {
      'data2_fsdp2': (dict(data=2, fsdp=2, tensor=1), dict(data=1, fsdp=1, tensor=1)),
      'hybrid': (dict(data=1, fsdp=2, tensor=1), dict(data=2, fsdp=1, tensor=1)),
  }
  for name in mesh_names:
    mesh, dcn = layouts[name]
    config = small_config(mesh)
    config.unlock()
    config.mesh_dcn.update(dcn)
    config.lock()
    program = program_for(config)
    if name == 'hybrid':   # each process's devices form one 'fsdp' row of the mesh
      rows = [{d.process_index for d in row.flat} for row in program.mesh.devices]
      assert all(len(r) == 1 for r in rows) and len({min(r) for r in rows}) == 2, rows
    losses, state = one_step(program, steps=2)
    save_params(os.path.join(out_dir, f'{name}_p{jax.process_count()}.npz'), losses,
                state.params)


def save_fsdp(out_dir: str) -> None:
  """Trains one step under fsdp=8 and checkpoints it (the mesh to restore from)."""
  program = program_for(small_config(MESHES['fsdp8']))
  losses, state = one_step(program)
  checkpointer = ckpt_lib.Checkpointer(out_dir, max_to_keep=1, async_save=False)
  checkpointer.save(1, state, {'step': 1, 'data': {'examples_seen': 16}})
  checkpointer.wait()
  checkpointer.close()
  save_params(os.path.join(out_dir, 'saved.npz'), losses, state.params)


def restore_data_parallel(out_dir: str) -> None:
  """Restores save_fsdp's checkpoint on this process's (fewer) devices, data parallel, and
  trains on from it."""
  config = small_config(dict(data=-1, fsdp=1, tensor=1), preset='data_parallel')
  program = program_for(config)
  checkpointer = ckpt_lib.Checkpointer(out_dir, max_to_keep=1, async_save=False)
  state, meta = checkpointer.restore(1, program.abstract_state_with_shardings())
  wanted = jax.tree.leaves(program.state_shardings)
  got = [leaf.sharding for leaf in jax.tree.leaves(state)]
  assert all(w.is_equivalent_to(g, np.ndim(l)) for w, g, l in
             zip(wanted, got, jax.tree.leaves(state))), 'restored arrays are not in the new shardings'
  assert {d.id for d in jax.tree.leaves(state.params)[0].sharding.device_set} == {
      d.id for d in jax.devices()}
  save_params(os.path.join(out_dir, 'restored.npz'), np.array([meta['step']]), state.params)
  batch = global_batch(config)
  batch = sharding.put_global(batch, {k: program.batch_sharding for k in batch})
  state, metrics = program.train_step(state, batch)
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))


if __name__ == '__main__':
  case, *args = sys.argv[1:]
  {'meshes': meshes, 'processes': processes, 'save_fsdp': save_fsdp,
   'restore_data_parallel': restore_data_parallel}[case](*args)
  print(f'case {case} done on process {jax.process_index()} of {jax.process_count()}', flush=True)
