"""Command line: `python -m mmfusion.main --config configs/X.py[:arg] --workdir DIR [--config.k=v]`.

Flags -> locked config -> `train.run(config, workdir)`. Re-running on a workdir resumes it.
Several processes (`launch/`): the same command in each, with `--coordinator_address`,
`--num_processes`, `--process_id` (or their MMFUSION_* variables, or SLURM / a TPU pod).
"""
from __future__ import annotations

import os
import sys

# TensorFlow only feeds data; keep its start-up chatter out of the user's terminal.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmfusion import cli  # noqa: E402
from mmfusion import distributed  # noqa: E402  (imports JAX only when called)
from mmfusion import host_memory  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/shapes_clip.py[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and metrics go.')
flags.mark_flags_as_required(['config', 'workdir'])

# Multi-process runs; unset flags fall back to MMFUSION_* variables, then SLURM / TPU-pod
# detection (mmfusion/distributed.py). Nothing set: one process.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, which hosts the coordinator '
    '[MMFUSION_COORDINATOR_ADDRESS].')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the run; 1 forces one process [MMFUSION_NUM_PROCESSES].')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..num_processes-1 [MMFUSION_PROCESS_ID].')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None, 'Local accelerators this process drives, e.g. 0,1 (default: '
    'all; one per task under SLURM) [MMFUSION_LOCAL_DEVICE_IDS].')
_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'On an error, print the full traceback too (it always goes to '
    '<workdir>/error.log); by default an error is one line.')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_float(
    'distributed_timeout', None, 'Seconds to wait for the coordinator, then for every process '
    f'to join (default {distributed.DEFAULT_TIMEOUT_S:g}) [MMFUSION_DISTRIBUTED_TIMEOUT].')


def main():
  # Before anything touches a JAX device: `train` creates the mesh from jax.devices().
  try:
    distributed.initialize(
        coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, local_device_ids=_LOCAL_DEVICE_IDS.value,
        timeout_s=_DISTRIBUTED_TIMEOUT.value)
  except (ValueError, distributed.DistributedError) as e:
    sys.exit(f'mmfusion: {e}')
  from mmfusion import errors
  from mmfusion import train  # heavy imports after flag parsing, so --help is instant
  # Every error, during set-up (config values, mesh, data, tokenizer, model, objectives,
  # evaluators, init_from, the workdir's lock and checkpoints) or after it (restore, the first
  # batch, a non-finite loss, an evaluator, saving), ends as one line naming its cause.
  with errors.one_line('mmfusion', _WORKDIR.value, _VERBOSE.value):
    final = train.Trainer(_CONFIG.value, _WORKDIR.value).run_and_close()
  if distributed.is_primary():
    print('[mmfusion] final: ' + ', '.join(f'{k}={v:.4f}' for k, v in sorted(final.items())))


if __name__ == '__main__':
  # May restart the process (same pid and arguments) with huge pages: before anything else.
  host_memory.ensure_huge_pages_or_exit('mmfusion')
  cli.run(main, program='mmfusion')
