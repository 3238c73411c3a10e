"""The one trainer: every objective mix, every mesh, from scratch, resumed, or fine-tuned.

`run(config, workdir)`: validate -> dataset, mesh -> model -> sharded state (created, restored,
or initialised from another checkpoint) -> jitted steps -> evals -> checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import PartitionSpec as P

from mmfusion import accumulate
from mmfusion import adversarial
from mmfusion import checkpoint as ckpt_lib
from mmfusion import config as config_lib
from mmfusion import errors
from mmfusion import evals
from mmfusion import interrupt as interrupt_lib
from mmfusion import lock as lock_lib
from mmfusion import nonfinite
from mmfusion import objectives
from mmfusion import optim
from mmfusion import resume
from mmfusion import sharding
from mmfusion import writers
from mmfusion.data import ops as data_ops
from mmfusion.models import layers
from mmfusion.models import layout
from mmfusion.models import model as model_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32[2] key; per-step keys are folded in from `step`


# ----------------------------------------------------------------------------- set-up

def init_batch(config: ml_collections.ConfigDict, batch: int = 2) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch the model is initialised and checked with: what config.data.inputs
  promises (each input op's training entries)."""
  return {k: jax.ShapeDtypeStruct(shape, dtype)
          for k, (shape, dtype) in data_ops.training_spec(config, batch).items()}


def check_batch(batch: dict[str, Any], expected: dict[str, jax.ShapeDtypeStruct]) -> None:
  """The first real batch must agree with what the config promised the model."""
  for key, spec in expected.items():
    if key not in batch:
      raise ValueError(f'the input pipeline gave no {key!r}; it gave {sorted(batch)}.')
    got = batch[key]
    if tuple(got.shape[1:]) != tuple(spec.shape[1:]):
      raise ValueError(
          f'batch[{key!r}] has shape {tuple(got.shape)}, but the config implies '
          f'[batch, {", ".join(map(str, spec.shape[1:]))}] (config.data.inputs and their '
          'sizes, e.g. config.data.image_size / config.tokenizer.max_len).')


def log(message: str) -> None:
  """Prints on process 0 only, so N processes do not print N copies."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(f'[mmfusion] {message}')


class TrainProgram:
  """Everything a training step is, without data or I/O: the model, the optimiser, the state's
  layout and shardings, and the jitted step. The Trainer runs it; benchmarks time it.
  """

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.rules = sharding.rules_from_config(config.sharding)
    self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
    self.model = model_lib.build(config.model, vocab_size=vocab_size)
    self.adapters_only = (tuple(config.model.peft.train)
                          if model_lib.lora_options(config.model) else None)
    self.tx, self.lr_schedule = optim.make(config.optim, config.total_steps, config.freeze,
                                           self.adapters_only)

    self.nonfinite_mode = config.get('train', {}).get('nonfinite', 'stop')   # nonfinite.py
    self.expected_batch = init_batch(config)
    boxed = jax.eval_shape(self.model.init, jax.random.key(0), self.expected_batch)
    self.param_specs = nn.get_partition_spec(boxed)['params']
    self._check_names(nn.unbox(boxed)['params'])
    abstract_out = jax.eval_shape(
        lambda v, b: self.model.apply(v, b), nn.unbox(boxed), self.expected_batch)
    objectives.check_outputs(config.objectives, abstract_out, set(self.expected_batch))

    self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
    self.state_specs = TrainState(
        step=P(), params=self.param_specs,
        opt_state=sharding.opt_state_specs(self.abstract_state.opt_state, self.param_specs), rng=P())
    self.state_shardings = sharding.fit_shardings(
        self.abstract_state,
        sharding.logical_to_shardings(self.state_specs, self.mesh, self.rules))
    self._train_step = jax.jit(
        self._step, in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=0)

  def _check_names(self, params) -> None:
    for name in self.config.freeze:
      if name not in params:
        raise ValueError(f'config.freeze names {name!r}, which is not a top-level param sub-tree; '
                         f'the model has {sorted(params)}.')
    for name in self.adapters_only or ():
      if name not in params:
        raise ValueError(f'config.model.peft.train names {name!r}, which is not a top-level '
                         f'param sub-tree; the model has {sorted(params)}.')

  # -- state ------------------------------------------------------------------------------

  def _init_state(self, rng: jax.Array) -> TrainState:
    params_rng, train_rng = jax.random.split(rng)
    dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.expected_batch)
    params = nn.unbox(self.model.init(params_rng, dummy))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=jax.random.key_data(train_rng))

  def abstract_state_with_shardings(self) -> TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)

  def init_state(self, seed: int) -> TrainState:
    """A fresh state, created directly in its shardings (never whole on one device)."""
    init = jax.jit(self._init_state, out_shardings=self.state_shardings)
    return init(jax.random.key(seed))

  # -- step -------------------------------------------------------------------------------

  def _step(self, state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # 'dropout' keeps the step's key itself (as before the other streams existed).
    rngs = {name: jax.random.fold_in(rng, i) if i else rng
            for i, name in enumerate(model_lib.RNG_STREAMS)}

    def loss_of(out, b=batch):
      return objectives.total_loss(self.config.objectives, out, b, step=state.step)

    attack = dict(self.config.get('adversarial', {'type': ''}))
    attack_key = jax.random.fold_in(rng, len(model_lib.RNG_STREAMS))
    if attack['type'] == 'pgd':
      mean, std = config_lib.image_normalization(self.config)
      (_, metrics), grads = adversarial.pgd_value_and_grad(
          self.model, state.params, batch, loss_of, rngs, attack, attack_key,
          jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))
    elif attack['type'] == 'freelb':
      (_, metrics), grads = adversarial.freelb_value_and_grad(
          self.model, state.params, batch, loss_of, rngs, attack, attack_key)
    elif self.config.accum_steps > 1:
      (_, metrics), grads = accumulate.value_and_grad(
          self.model, state.params, batch, loss_of, rngs, self.config.accum_steps)
    else:
      (_, metrics), grads = jax.value_and_grad(
          lambda p: loss_of(self.model.apply({'params': p}, batch, train=True, rngs=rngs)),
          has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    finite = jnp.all(jnp.stack([jnp.isfinite(v).all() for v in jax.tree.leaves(metrics)]))
    if self.nonfinite_mode == 'skip':
      # The update is dropped: params and optimizer state stay as they were (the step counts).
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics[nonfinite.FLAG] = jnp.logical_not(finite).astype(jnp.float32)
    metrics['lr'] = self.lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def train_step(self, state: TrainState, batch: dict[str, jax.Array]):
    """(state, batch) -> (new state, metrics); `state` is donated: do not use it afterwards."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._train_step(state, batch)

  def lower_train_step(self, state: TrainState, batch: dict[str, Any]) -> jax.stages.Lowered:
    """The step lowered for `state` / `batch` (arrays or ShapeDtypeStructs), for compiling
    ahead of time and for XLA's cost and memory analyses."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._train_step.lower(state, batch)


class Trainer:
  """Holds what one run needs; `run()` is the loop. Reads top to bottom like the step flow."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    config_lib.validate(config, jax.device_count(), sharding.granules()[0])
    # Reading data imports TensorFlow; TrainProgram (the step alone, as benchmarks time it)
    # needs none of it.
    from mmfusion.data import sources  # noqa: PLC0415
    from mmfusion.data import training as training_data  # noqa: PLC0415
    self.source = sources.Source(config)
    self.source.builder           # the dataset is resolved (and rendered) before anything else
    self.config = config = config_lib.resolve(config, self.source)
    # The data must hold a batch (checked before anything is compiled).
    self.steps_per_epoch = training_data.steps_per_epoch(self.source)
    self.mesh = sharding.make_mesh(config.mesh, dcn_config=config.mesh_dcn)
    vocab_size = (self.source.tokenizer.vocab_size
                  if model_lib.reads_tokens(config.model) else 0)
    self.program = program = TrainProgram(config, vocab_size, self.mesh)
    self.model, self.expected_batch = program.model, program.expected_batch
    self._report_layout()

    self.evaluators = {
        name: evals.build(name, cfg, model=self.model, config=config, source=self.source,
                          mesh=self.mesh, rules=program.rules)
        for name, cfg in config.evals.items()}
    for evaluator in self.evaluators.values():
      evaluator.check_split()
    self.failed_evals: dict[str, str] = {}
    self.skipped_steps = 0                # updates dropped as non-finite (nonfinite='skip')

    self.lock = lock_lib.WorkdirLock(self.workdir)
    if jax.process_index() == 0:
      self.lock.acquire()
      if self.lock.stale_owner:
        log(f'took over the lock of a run that ended without releasing it '
            f'({lock_lib.describe(self.lock.stale_owner)}).')
    try:
      self.checkpointer = ckpt_lib.Checkpointer(
          self.workdir, max_to_keep=config.checkpoint.max_to_keep,
          async_save=config.checkpoint.async_save)
      self.finished = self._check_resume()
      self.writer = writers.MetricWriter(self.workdir)
    except BaseException:
      self.lock.release()
      raise

  def _check_resume(self) -> dict[str, float] | None:
    """Checks this config against the newest checkpoint's (resume.py); returns the final
    metrics when that checkpoint is this run's last step and its final evaluation was written
    (nothing left to do), else None."""
    for step in reversed(self.checkpointer.all_steps()):
      try:
        meta = self.checkpointer.read_meta(step)
      except ckpt_lib.UnreadableCheckpoint:
        continue        # create_state sets damaged checkpoints aside, and says so
      where = f'{self.checkpointer.directory}/{step}'
      accepted = resume.check(meta.get('config', {}), self.config, step, where, config_lib.base())
      if accepted:
        log(f'warning: resuming {where} with changed settings (checkpoint -> now): '
            + '; '.join(accepted) + '.')
      final_path = os.path.join(self.workdir, 'final_metrics.json')
      if step == self.config.total_steps and os.path.exists(final_path):
        with open(final_path) as f:
          final = json.load(f)
        if final.get('step') == step:
          return {k: v for k, v in final.items() if k != 'step'}
      return None
    return None

  def _report_layout(self) -> None:
    """Prints the mesh and the bytes each device holds; refuses an FSDP run that leaves too
    much of the model replicated (config.sharding.max_replicated_fraction)."""
    cfg = self.config.sharding
    mem = sharding.state_memory(self.program.abstract_state, self.program.state_shardings,
                                min_bytes=cfg.min_bytes)
    mib = lambda n: f'{n / 2**20:.1f} MiB'
    log(f'mesh {dict(self.mesh.shape)} over {jax.device_count()} devices in '
        f'{jax.process_count()} process(es); rules {cfg.preset!r}'
        + (f' + {list(cfg.rules)}' if cfg.rules else '') + '.')
    log(f"{mem['num_params'] / 1e6:.2f} M params: {mib(mem['param_bytes'])} in total, "
        f"{mib(mem['param_bytes_per_device'])} per device; optimizer state "
        f"{mib(mem['opt_bytes'])}, {mib(mem['opt_bytes_per_device'])} per device.")
    params = self.program.abstract_state.params
    learns = optim.trainable(params, self.config.freeze, self.program.adapters_only)
    sizes = [(int(np.prod(p.shape)), t) for p, t in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(learns))]
    total, trained = sum(n for n, _ in sizes), sum(n for n, t in sizes if t)
    if trained < total:
      log(f'trainable: {trained:,} of {total:,} params ({100 * trained / max(total, 1):.2f}%); '
          'the rest frozen (config.freeze / config.model.peft).')
    message = sharding.replication_error(mem, self.mesh, cfg.max_replicated_fraction)
    if message and not cfg.allow_replicated:
      raise ValueError(message)
    if message:
      log('warning: ' + message)

  # -- state ------------------------------------------------------------------------------

  def create_state(self) -> tuple[TrainState, dict[str, Any]]:
    """Restores the latest checkpoint of this workdir, else initialises (and init_from)."""
    restored = self.checkpointer.restore_newest(self.program.abstract_state_with_shardings(), log)
    if restored is not None:
      state, meta = restored
      latest = int(state.step)
      expected_seen = int(state.step) * self.config.batch_size
      if meta.get('data', {}).get('examples_seen') != expected_seen:
        raise ckpt_lib.CheckpointError(
            f'{self.checkpointer.directory}/{latest}: the checkpoint saw '
            f"{meta.get('data', {}).get('examples_seen')} examples in {int(state.step)} steps, "
            f'which does not fit config.batch_size = {self.config.batch_size}; resume with the '
            'batch size it was written with.')
      log(f'resumed from {self.checkpointer.directory}/{latest} (step {latest}).')
      self.skipped_steps = int(meta.get('nonfinite_skipped', 0))
      return state, meta
    state = self.program.init_state(self.config.seed)
    if self.config.init_from.path:
      state = self._init_from(state)
    return state, {}

  def _init_from(self, state: TrainState) -> TrainState:
    cfg = self.config.init_from
    source = ckpt_lib.find_step_dir(cfg.path) + (f' [{cfg.load}]' if cfg.load else '')
    current = sharding.to_host(state.params)
    loaded = ckpt_lib.load_params(cfg.path, cfg.load)
    loaded, renamed = ckpt_lib.upgrade_legacy(loaded)
    if renamed:
      log(f'renamed the heads of {source} to their names in config.model.heads: {renamed}.')
    scanned = layout.is_scanned(current)
    if layout.is_scanned(loaded) not in (None, scanned):
      # Checkpoints convert between scanned and unrolled towers (config.model.scan_layers).
      loaded = layout.match_layout(loaded, current)
      log(f"converted {source} to the {'scanned' if scanned else 'unrolled'} layer layout.")
    merged = ckpt_lib.merge_params(
        current, loaded, into=cfg.into or cfg.load, skip=tuple(cfg.skip),
        source=f'checkpoint {source}',
        # LoRA on a checkpoint without adapters: they start at init (B = 0: the base model).
        keep_init=layers.LORA_PARAMS if self.program.adapters_only is not None else ())
    shardings = self.program.state_shardings
    params = sharding.put_global(merged, shardings.params)
    opt_state = jax.jit(self.program.tx.init, out_shardings=shardings.opt_state)(params)
    log(f'initialised {cfg.into or cfg.load or "all params"} from {source}.')
    return state.replace(params=params, opt_state=opt_state)

  # -- evaluation and saving ----------------------------------------------------------------

  def evaluate(self, state: TrainState, step: int, final: bool = False) -> dict[str, float]:
    """Runs the evaluators due at `step` (all when `final`). One that fails is reported in one
    line (traceback in the error log) and left out from then on; the run goes on, and ends
    with its checkpoint written and a failing exit code."""
    results = {}
    for name, evaluator in list(self.evaluators.items()):
      every = int(self.config.evals[name].get('every', 0))
      if not final and not (every and step % every == 0):
        continue
      t0 = time.perf_counter()
      try:
        for metric, value in evaluator.run(state.params):
          results[f'{name}/{metric}'] = float(value)
      except Exception as e:  # noqa: BLE001 (an evaluator's failure must not cost the run)
        if jax.process_count() > 1:
          raise     # the other processes are in the evaluator's collectives: stop them all
        where = errors.write_log(e, self.workdir)
        self.failed_evals[name] = errors.describe(e)
        del self.evaluators[name]
        log(f'evaluator {name!r} failed at step {step}: {self.failed_evals[name]} (left out from '
            f'now on; traceback in {where}).')
        continue
      results[f'{name}/seconds'] = time.perf_counter() - t0
    if results:
      self.writer.write(step, results)
      shown = ', '.join(f'{k}={v:.4f}' for k, v in results.items() if not k.endswith('/seconds'))
      log(f'step {step} eval: {shown}')
    return results

  def save(self, state: TrainState, step: int, pending: list = ()) -> None:
    """Checkpoints `state` (after step `step`); `pending`: the steps' metrics not logged yet."""
    if self.checkpointer.latest_step() == step:
      return
    newly_skipped = nonfinite.count(pending)     # one host sync for the steps since the log
    if newly_skipped:
      self._stop_if_nonfinite(pending)
    meta = {
        'step': step,
        'data': {'examples_seen': step * self.config.batch_size,
                 'epoch': step // self.steps_per_epoch,
                 'batch_in_epoch': step % self.steps_per_epoch},
        'nonfinite_skipped': self.skipped_steps + newly_skipped,
        'config': self.config.to_dict(),
    }
    self.checkpointer.save(step, state, json.loads(json.dumps(meta, default=str)))

  # -- loop -------------------------------------------------------------------------------

  def run(self) -> dict[str, float]:
    config = self.config
    if self.finished is not None:
      log(f'{self.workdir} has finished its {config.total_steps} steps and their final '
          'evaluation (final_metrics.json): nothing to do; raise config.total_steps to train on.')
      return self.finished
    if jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
    state, _ = self.create_state()
    start = int(state.step)
    from mmfusion.data import training as training_data  # noqa: PLC0415
    batches = training_data.batches(self.source, self.program.batch_sharding, start_step=start)

    pending: list[tuple[int, dict[str, jax.Array]]] = []     # (step, metrics) since the last log
    wait_s, t_log, step = 0.0, time.perf_counter(), start
    bar = tqdm.tqdm(total=config.total_steps, initial=start, desc='train', unit='step',
                    dynamic_ncols=True, disable=jax.process_index() != 0)
    # The bar ends its line however the loop ends, so that an error's line starts on its own.
    with interrupt_lib.Interrupt() as interrupt, contextlib.closing(bar):
      for step in range(start + 1, config.total_steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t0
        batch = {k: batch[k] for k in self.expected_batch if k in batch}
        if step == start + 1:
          check_batch(batch, self.expected_batch)
        state, metrics = self.program.train_step(state, batch)
        pending.append((step, metrics))     # fetched only at log steps: no host sync per step
        bar.update(1)

        if step % config.log_every == 0 or step == config.total_steps:
          self._stop_if_nonfinite(pending)
          logged = self._log(step, pending, time.perf_counter() - t_log, wait_s)
          bar.set_postfix(loss=f"{logged['loss']:.4f}", ex_s=f"{logged['examples_per_sec']:.0f}",
                          data_wait=f"{logged['data_wait_fraction']:.1%}")
          pending, wait_s, t_log = [], 0.0, time.perf_counter()
        if config.checkpoint.every and step % config.checkpoint.every == 0:
          self.save(state, step, pending)
        if step < config.total_steps:
          self.evaluate(state, step)
        at_log_step = step % config.log_every == 0
        if (signum := interrupt.agreed(at_log_step)) is not None:
          self.save(state, step, pending)
          self.checkpointer.wait()
          self.writer.close()
          log(f'stopped at step {step}; checkpoint saved in {self.checkpointer.directory}. '
              'Re-run the same command to resume.')
          raise SystemExit(128 + signum)
    # The final checkpoint is written before the final evaluation: a failing evaluator costs
    # no training.
    self.save(state, config.total_steps, pending)
    self.checkpointer.wait()
    final = self.evaluate(state, config.total_steps, final=True)
    self.writer.close()
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, 'final_metrics.json'), 'w') as f:
        json.dump({'step': config.total_steps, **final}, f, indent=2)
    if self.failed_evals:
      raise errors.RunFailed(
          f'trained to step {config.total_steps} and saved the checkpoint '
          f'{self.checkpointer.directory}/{config.total_steps}, but evaluator(s) failed: '
          + '; '.join(f'{name}: {cause}' for name, cause in self.failed_evals.items())
          + f' (tracebacks in {os.path.join(self.workdir, errors.ERROR_LOG)}).')
    return final

  def run_and_close(self) -> dict[str, float]:
    try:
      return self.run()
    finally:
      with contextlib.suppress(Exception):
        self.checkpointer.close()
      self.lock.release()

  def _stop_if_nonfinite(self, pending: nonfinite.Pending) -> None:
    if self.program.nonfinite_mode == 'stop':
      latest = self.checkpointer.latest_step()
      nonfinite.stop_if_any(
          pending, lr=self.config.optim.lr,
          last_checkpoint=None if latest is None else f'{self.checkpointer.directory}/{latest}')

  def _log(self, step, pending, seconds, wait_s) -> dict[str, float]:
    fetched = [m for _, m in jax.device_get(pending)]
    skipped = int(sum(m[nonfinite.FLAG] for m in fetched))
    # Means over the steps whose update was applied (all of them unless nonfinite='skip').
    kept = [m for m in fetched if not m[nonfinite.FLAG]] or fetched
    logged = {k: float(np.mean([m[k] for m in kept])) for k in fetched[-1] if k != nonfinite.FLAG}
    logged['lr'] = float(fetched[-1]['lr'])
    if skipped:
      self.skipped_steps += skipped
      log(f'warning: {skipped} step(s) up to step {step} had non-finite losses or gradients; '
          f'their updates were dropped (config.train.nonfinite=skip; {self.skipped_steps} so far).')
    if self.program.nonfinite_mode == 'skip':
      logged['skipped_steps'] = self.skipped_steps
    logged['steps_per_sec'] = len(pending) / seconds
    logged['examples_per_sec'] = len(pending) * self.config.batch_size / seconds
    logged['data_wait_fraction'] = wait_s / seconds
    self.writer.write(step, logged)
    return logged


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  return Trainer(config, workdir).run_and_close()
