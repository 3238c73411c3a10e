"""Multi-process start-up: `initialize()` starts `jax.distributed` from flags, the environment
or the cluster, before anything touches a JAX device.

Where the process layout comes from, first match wins:
  1. arguments (`python -m mmfusion.main --coordinator_address=... --num_processes=...`);
  2. environment: MMFUSION_COORDINATOR_ADDRESS (or JAX's own JAX_COORDINATOR_ADDRESS),
     MMFUSION_NUM_PROCESSES, MMFUSION_PROCESS_ID, MMFUSION_LOCAL_DEVICE_IDS (`0,1`),
     MMFUSION_DISTRIBUTED_TIMEOUT (seconds);
  3. the cluster: a SLURM step with several tasks (`srun`), or a Cloud TPU VM pod with several
     workers; JAX's cluster detection (`jax._src.clusters`) fills in what 1 and 2 leave unset.
With none of these a run is one process and nothing is started.

JAX ends the process (a fatal log and SIGABRT; a segfault when the coordinator port is taken)
where it cannot start the runtime. So the failures people actually hit are checked here first,
and come back as a `DistributedError` that says what to change: the coordinator port is in use
(process 0), the coordinator does not answer (every other process), or not every process joined.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import socket
import sys
import threading
import time
from typing import Mapping, Sequence

DEFAULT_TIMEOUT_S = 300.0

# How each setting is named to the user: the flag, then the environment variable(s), so that
# an error names what to change wherever the value came from.
_NAMES = {
    'coordinator_address': ('--coordinator_address', 'MMFUSION_COORDINATOR_ADDRESS',
                            'JAX_COORDINATOR_ADDRESS'),
    'num_processes': ('--num_processes', 'MMFUSION_NUM_PROCESSES'),
    'process_id': ('--process_id', 'MMFUSION_PROCESS_ID'),
    'local_device_ids': ('--local_device_ids', 'MMFUSION_LOCAL_DEVICE_IDS'),
    'timeout_s': ('--distributed_timeout', 'MMFUSION_DISTRIBUTED_TIMEOUT'),
}


class DistributedError(RuntimeError):
  """The multi-process runtime could not start; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """The explicit part of the process layout (None: unset), and where each value came from."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  timeout_s: float = DEFAULT_TIMEOUT_S
  origins: Mapping[str, str] = dataclasses.field(default_factory=dict)   # key -> flag or env

  @property
  def complete(self) -> bool:
    return None not in (self.coordinator_address, self.num_processes, self.process_id)

  def name(self, key: str) -> str:
    """`--flag / ENV` for a setting, or the one of them that actually set it."""
    return self.origins.get(key) or ' / '.join(_NAMES[key][:2])


# ----------------------------------------------------------------------------- resolution

def resolve(coordinator_address: str | None = None,
            num_processes: int | None = None,
            process_id: int | None = None,
            local_device_ids: Sequence[int | str] | str | None = None,
            timeout_s: float | None = None,
            environ: Mapping[str, str] | None = None) -> Layout:
  """Arguments over environment; parsed and checked. Pure: no JAX, no network.

  Raises ValueError naming the flag or variable to change.
  """
  environ = os.environ if environ is None else environ
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes,
               process_id=process_id, local_device_ids=local_device_ids, timeout_s=timeout_s)
  raw, origins = {}, {}
  for key, names in _NAMES.items():
    if given[key] is not None and given[key] != '' and given[key] != []:
      raw[key], origins[key] = given[key], names[0]
      continue
    for env in names[1:]:
      if environ.get(env, '').strip():
        raw[key], origins[key] = environ[env].strip(), env
        break

  def fail(key, why):
    raise ValueError(f'{origins[key]}: {why}' if key in origins else why)

  def integer(key):
    if key not in raw:
      return None
    try:
      return int(str(raw[key]).strip())
    except ValueError:
      fail(key, f'expected an integer, got {raw[key]!r}')

  layout = dict(origins=origins)
  if 'coordinator_address' in raw:
    address = str(raw['coordinator_address']).strip()
    try:
      split_address(address)
    except ValueError as e:
      fail('coordinator_address', str(e))
    layout['coordinator_address'] = address
  n, i = integer('num_processes'), integer('process_id')
  if n is not None and n < 1:
    fail('num_processes', f'the number of processes must be at least 1, got {n}')
  if i is not None and i < 0:
    fail('process_id', f'process ids start at 0, got {i}')
  if n is not None and i is not None and i >= n:
    fail('process_id', f'process ids of {n} processes are 0..{n - 1}, got {i}; change it or '
                       f'the process count ({origins["num_processes"]})')
  layout.update(num_processes=n, process_id=i)
  if 'local_device_ids' in raw:
    ids = raw['local_device_ids']
    items = ids.split(',') if isinstance(ids, str) else list(ids)
    try:
      parsed = tuple(int(str(x).strip()) for x in items if str(x).strip())
    except ValueError:
      fail('local_device_ids', f'expected a comma-separated list of device numbers, got {ids!r}')
    if not parsed or min(parsed) < 0 or len(set(parsed)) != len(parsed):
      fail('local_device_ids', f'expected distinct device numbers >= 0, got {ids!r}')
    layout['local_device_ids'] = parsed
  if 'timeout_s' in raw:
    try:
      layout['timeout_s'] = float(str(raw['timeout_s']).strip())
    except ValueError:
      fail('timeout_s', f'expected a number of seconds, got {raw["timeout_s"]!r}')
    if not math.isfinite(layout['timeout_s']) or layout['timeout_s'] <= 0:
      fail('timeout_s', f'the timeout must be a positive number of seconds, got {raw["timeout_s"]!r}')
  return Layout(**layout)


def check_complete(layout: Layout) -> None:
  """Without a cluster to fill in the gaps, an explicit layout needs its three parts together.

  `num_processes=1` alone is complete: it asks for one process (and switches detection off).
  """
  keys = ('coordinator_address', 'num_processes', 'process_id')
  have = [k for k in keys if getattr(layout, k) is not None]
  if not have or layout.complete or (have == ['num_processes'] and layout.num_processes == 1):
    return
  missing = [k for k in keys if k not in have]
  raise ValueError(
      f'{" and ".join(layout.name(k) for k in have)} {"is" if len(have) == 1 else "are"} set '
      f'but {" and ".join(layout.name(k) for k in missing)} {"is" if len(missing) == 1 else "are"} '
      f'not: a multi-process run needs all three (each process its own process id), or none '
      f'of them for a single process or a SLURM / TPU-pod run that detects them.')


def split_address(address: str) -> tuple[str, int]:
  """`host:port` (or `[v6]:port`) -> (host, port); ValueError saying what is wrong."""
  host, sep, port = address.rpartition(':')
  host = host[1:-1] if host.startswith('[') and host.endswith(']') else host
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'expected the coordinator as host:port (e.g. 10.0.0.1:1234, where '
                     f'10.0.0.1 is the host of process 0), got {address!r}')
  return host, int(port)


# ----------------------------------------------------------------------------- clusters

def slurm_tasks(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
  """(tasks, nodes) of the SLURM job step this process is a task of; None outside a step.

  Inside `sbatch` but outside `srun` the step variables JAX's detection reads are missing.
  """
  environ = os.environ if environ is None else environ
  step = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
          'SLURM_LOCALID')   # what jax._src.clusters.SlurmCluster.is_env_present() checks
  if not all(v in environ for v in step):
    return None
  tasks = int(environ.get('SLURM_STEP_NUM_TASKS') or environ['SLURM_NTASKS'])
  nodes = int(environ.get('SLURM_STEP_NUM_NODES') or environ.get('SLURM_NNODES') or 1)
  return tasks, nodes


def slurm_local_device_ids(environ: Mapping[str, str] | None = None) -> tuple[int, ...] | None:
  """The GPUs a SLURM task drives where JAX's default is wrong; None to keep JAX's default.

  JAX's SLURM detection gives each task the one GPU numbered SLURM_LOCALID: right for one
  process per GPU on shared GPUs, but one process per node would then drive GPU 0 only, and
  a task bound to one GPU (`--gpus-per-task=1`) sees it as GPU 0 whatever its SLURM_LOCALID.
  """
  environ = os.environ if environ is None else environ
  tasks_nodes = slurm_tasks(environ)
  if tasks_nodes is None:
    return None
  visible = [d for d in environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  count = len(visible) or int(environ.get('SLURM_GPUS_ON_NODE') or 0)
  if count == 1:
    return (0,)
  if tasks_nodes[0] == tasks_nodes[1] and count:   # one task per node
    return tuple(range(count))
  return None


def _tpu_pod_workers() -> int:
  """Workers of this Cloud TPU VM slice(s): 0 off Cloud TPU, else >= 1.

  Reads `jax._src.clusters` (JAX's own detection; GCE asks the metadata server).
  """
  from jax._src import cloud_tpu_init   # `import jax` has run cloud_tpu_init() by now
  if not cloud_tpu_init.running_in_cloud_tpu_vm:
    return 0
  try:
    from jax._src import clusters
    for env in (clusters.GkeTpuCluster, clusters.GceTpuCluster):
      if env.is_env_present():
        return env.get_process_count()
  except Exception:  # noqa: BLE001 -- private API. Without jax.distributed the TPU runtime
    return 1         # still joins the pod's hosts itself; only the extra services are missing.
  return 1


# ----------------------------------------------------------------------------- start-up

def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int | str] | str | None = None,
               timeout_s: float | None = None) -> bool:
  """Starts `jax.distributed` when the run has several processes; True if it did.

  Call it first thing, before any JAX device is used. Raises ValueError for an impossible
  setting and DistributedError when the runtime cannot start, both naming what to change.
  """
  layout = resolve(coordinator_address, num_processes, process_id, local_device_ids, timeout_s)
  if layout.num_processes == 1:
    return False   # asked for one process: nothing to coordinate, no cluster detection

  import jax
  from jax._src import xla_bridge

  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if layout.complete:
    who = f'process {layout.process_id} of {layout.num_processes}'
    needed = (f'all {layout.num_processes} processes must start, with the same '
              f'{layout.name("num_processes")} and {layout.name("coordinator_address")} and '
              f'each its own {layout.name("process_id")}')
    kwargs['cluster_detection_method'] = 'deactivate'   # explicit means explicit
  elif (tasks_nodes := slurm_tasks()) is not None and tasks_nodes[0] > 1:
    who = f'SLURM task {os.environ["SLURM_PROCID"]} of {tasks_nodes[0]}'
    needed = ('every task of the srun step must start and reach its first node on the '
              'coordinator port (JAX_COORDINATOR_PORT to choose another)')
    kwargs['cluster_detection_method'] = 'slurm'
    if layout.local_device_ids is None:
      layout = dataclasses.replace(layout, local_device_ids=slurm_local_device_ids())
  elif _tpu_pod_workers() > 1:
    who = 'this TPU pod worker'
    needed = ('every worker of the pod must run the same command (launch/tpu_pod.sh runs it '
              'on all of them) and reach worker 0 on the coordinator port')
  else:
    check_complete(layout)   # a partial layout with no cluster to fill it in
    if os.environ.get('SLURM_JOB_ID') and int(os.environ.get('SLURM_NTASKS') or 1) > 1:
      # `python ...` in an sbatch script: the job's tasks are meant for `srun`.
      print(f'mmfusion: this SLURM job has {os.environ["SLURM_NTASKS"]} tasks, but this '
            f'process was not started by srun: running as one process (`srun python -m '
            f'mmfusion.main ...` starts one per task).', file=sys.stderr)
    return False

  if xla_bridge.backends_are_initialized():
    raise DistributedError(
        'jax.distributed must start before anything uses a JAX device (jax.devices(), an '
        'array, a jit call, ...): call mmfusion.distributed.initialize() first thing.')
  # Cross-process collectives on CPU (JAX_PLATFORMS=cpu, or the CPU side of a GPU/TPU run):
  # gloo over TCP; older JAX versions default to none, which makes a multi-process CPU run
  # fail at its first cross-process op. An explicit JAX_CPU_COLLECTIVES_IMPLEMENTATION wins.
  if not os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')

  if layout.complete:
    if layout.process_id == 0:
      _check_port_free(layout, who)
    else:
      _wait_for_coordinator(layout, who)
  _start(layout, who, needed, kwargs)
  return True


def _check_port_free(layout: Layout, who: str) -> None:
  """Process 0 hosts the coordinator; JAX segfaults when its port is taken."""
  if os.environ.get('JAX_COORDINATOR_BIND_ADDRESS'):
    return   # binds elsewhere; not ours to second-guess
  _, port = split_address(layout.coordinator_address)
  for family, any_host in ((socket.AF_INET6, '::'), (socket.AF_INET, '0.0.0.0')):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((any_host, port))
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedError(
            f'{who} hosts the coordinator, but port {port} of {layout.coordinator_address} is '
            f'already in use on this machine (another run?): pick a free port in '
            f'{layout.name("coordinator_address")}, the same for every process.') from None
      # no IPv6 on this machine: try IPv4


def _wait_for_coordinator(layout: Layout, who: str) -> None:
  """Waits until the coordinator's port accepts connections: JAX aborts the process (SIGABRT,
  after its timeout) where it does not, so this is where that failure gets its message."""
  host, port = split_address(layout.coordinator_address)
  deadline = time.monotonic() + layout.timeout_s
  while True:
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining))):
        return
    except OSError as e:
      last = e
    if time.monotonic() + 0.5 >= deadline:
      break
    time.sleep(0.5)
  raise DistributedError(
      f'{who} could not reach the coordinator at {layout.coordinator_address} within '
      f'{layout.timeout_s:g} s ({last.strerror or last}): start process 0 (it hosts the '
      f'coordinator) or fix {layout.name("coordinator_address")}; check that the port is open '
      f'between the hosts, or raise {layout.name("timeout_s")} if process 0 starts slowly.')


def _start(layout: Layout, who: str, needed: str, kwargs: dict) -> None:
  """`jax.distributed.initialize` under a watchdog.

  Once the coordinator answers, JAX waits for every process to register and aborts the
  process at its own timeout. The watchdog fires first (JAX gets a longer timeout), says which
  setting to look at, and ends the process: the waiting call cannot be interrupted.
  """
  import jax

  what = (f'{who} could not start the distributed runtime within {layout.timeout_s:g} s: '
          f'{needed}; raise {layout.name("timeout_s")} if they start slowly.')

  def expire():
    print(f'mmfusion: {what}', file=sys.stderr, flush=True)
    os._exit(1)

  watchdog = threading.Timer(layout.timeout_s, expire)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        coordinator_address=layout.coordinator_address,
        num_processes=layout.num_processes,
        process_id=layout.process_id,
        local_device_ids=list(layout.local_device_ids) if layout.local_device_ids else None,
        initialization_timeout=int(math.ceil(layout.timeout_s)) + 60,
        **kwargs)
  except (RuntimeError, ValueError) as e:   # e.g. no cluster where one seemed to be
    raise DistributedError(f'{who}: jax.distributed.initialize failed: {e}') from e
  finally:
    watchdog.cancel()


def is_primary() -> bool:
  """Process 0: the one that writes logs and prints."""
  import jax
  return jax.process_index() == 0
