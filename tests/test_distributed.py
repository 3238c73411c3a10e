"""Multi-process start-up (mmfusion/distributed.py) and the launch/ scripts.

Real multi-process runs use CPU devices and gloo collectives over localhost, started by
launch/local_multiprocess.sh as a user would; failures are checked for one clear line.
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mmfusion import distributed
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = ['local_multiprocess.sh', 'tpu_pod.sh', 'slurm_gpu.sbatch']
ENV_KEYS = [k for names in distributed._NAMES.values() for k in names[1:]]


def free_port():
  with socket.socket() as s:
    s.bind(('', 0))
    return s.getsockname()[1]


def clean_env(**extra):
  """This environment without any multi-process settings, on CPU."""
  env = {k: v for k, v in os.environ.items()
         if k not in ENV_KEYS and not k.startswith('SLURM_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''), **extra)
  return env


def cli(*flags, timeout=90, **env):
  """`python -m mmfusion.main` with the smoke config; (returncode, stdout + stderr, seconds)."""
  start = time.monotonic()
  run = subprocess.run(
      [sys.executable, '-m', 'mmfusion.main', '--config', 'configs/shapes_clip.py:smoke',
       '--workdir', os.path.join(ROOT, 'workdirs', 'never_created'), *flags],
      cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)
  return run.returncode, run.stdout + run.stderr, time.monotonic() - start


def one_line(output):
  """The output is a single `mmfusion: ...` line (no traceback, no JAX fatal log)."""
  lines = [l for l in output.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('mmfusion: '), output
  assert 'Traceback' not in output
  return lines[0]


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize('kwargs, env, culprit', [
    (dict(num_processes=0), {}, '--num_processes'),
    (dict(num_processes=2, process_id=2), {}, '--process_id'),
    (dict(process_id=-1), {}, '--process_id'),
    (dict(num_processes=2), {'MMFUSION_PROCESS_ID': '5'}, 'MMFUSION_PROCESS_ID'),
    ({}, {'MMFUSION_NUM_PROCESSES': 'two'}, 'MMFUSION_NUM_PROCESSES'),
    (dict(coordinator_address='localhost'), {}, '--coordinator_address'),
    (dict(coordinator_address='localhost:99999'), {}, '--coordinator_address'),
    ({}, {'JAX_COORDINATOR_ADDRESS': ':1234'}, 'JAX_COORDINATOR_ADDRESS'),
    (dict(local_device_ids=['0', 'x']), {}, '--local_device_ids'),
    ({}, {'MMFUSION_LOCAL_DEVICE_IDS': '0,0'}, 'MMFUSION_LOCAL_DEVICE_IDS'),
    (dict(timeout_s=0), {}, '--distributed_timeout'),
    ({}, {'MMFUSION_DISTRIBUTED_TIMEOUT': 'soon'}, 'MMFUSION_DISTRIBUTED_TIMEOUT'),
])
def test_impossible_settings_name_what_to_change(kwargs, env, culprit):
  with pytest.raises(ValueError, match=re.escape(culprit)):
    distributed.resolve(**kwargs, environ=env)


def test_arguments_override_the_environment():
  env = {'MMFUSION_COORDINATOR_ADDRESS': 'envhost:1', 'JAX_COORDINATOR_ADDRESS': 'jaxhost:2',
         'MMFUSION_NUM_PROCESSES': '4', 'MMFUSION_PROCESS_ID': '3',
         'MMFUSION_LOCAL_DEVICE_IDS': '0, 1', 'MMFUSION_DISTRIBUTED_TIMEOUT': '7.5'}
  layout = distributed.resolve(process_id=1, environ=env)
  assert (layout.coordinator_address, layout.num_processes, layout.process_id) == (
      'envhost:1', 4, 1)
  assert layout.local_device_ids == (0, 1) and layout.timeout_s == 7.5
  assert layout.name('process_id') == '--process_id'
  assert layout.name('num_processes') == 'MMFUSION_NUM_PROCESSES'
  del env['MMFUSION_COORDINATOR_ADDRESS']
  assert distributed.resolve(environ=env).coordinator_address == 'jaxhost:2'
  assert distributed.resolve(environ={}) == distributed.Layout()
  assert distributed.Layout().timeout_s == 300


def test_a_partial_layout_needs_the_missing_settings():
  with pytest.raises(ValueError, match='--coordinator_address / MMFUSION_COORDINATOR_ADDRESS '
                                       'and --process_id / MMFUSION_PROCESS_ID are not'):
    distributed.check_complete(distributed.resolve(num_processes=2, environ={}))
  with pytest.raises(ValueError, match='MMFUSION_NUM_PROCESSES is not'):
    distributed.check_complete(distributed.resolve(
        environ={'MMFUSION_COORDINATOR_ADDRESS': 'h:1', 'MMFUSION_PROCESS_ID': '0'}))
  for ok in (dict(), dict(num_processes=1),
             dict(coordinator_address='h:1', num_processes=2, process_id=1)):
    distributed.check_complete(distributed.resolve(**ok, environ={}))


def test_nothing_set_is_one_process(monkeypatch, capsys):
  for key in ENV_KEYS + ['SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NODELIST']:
    monkeypatch.delenv(key, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  # `python ...` inside an sbatch script, not under srun: one process, and a note why.
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert distributed.initialize() is False
  assert 'not started by srun' in capsys.readouterr().err


def test_slurm_gpus_per_process():
  step = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_PROCID': '0',
          'SLURM_LOCALID': '0', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
  # One task per GPU: JAX's own choice (the GPU numbered SLURM_LOCALID).
  assert distributed.slurm_local_device_ids(dict(step, SLURM_NTASKS='16',
                                                 SLURM_STEP_NUM_NODES='2')) is None
  # One task per node: all of the node's GPUs.
  assert distributed.slurm_local_device_ids(dict(step, SLURM_NTASKS='2',
                                                 SLURM_STEP_NUM_NODES='2')) == tuple(range(8))
  # A task bound to one GPU sees it as GPU 0.
  assert distributed.slurm_local_device_ids(dict(step, SLURM_NTASKS='16', SLURM_LOCALID='5',
                                                 CUDA_VISIBLE_DEVICES='5')) == (0,)
  assert distributed.slurm_tasks({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}) is None


# ----------------------------------------------------------------------------- failures

def test_a_coordinator_that_does_not_answer_is_one_line_that_says_what_to_change():
  port = free_port()   # nobody listens here
  code, out, seconds = cli(f'--coordinator_address=localhost:{port}', '--num_processes=2',
                           '--process_id=1', '--distributed_timeout=5')
  line = one_line(out)
  assert code != 0 and seconds < 60
  assert f'process 1 of 2 could not reach the coordinator at localhost:{port} within 5 s' in line
  assert 'start process 0' in line and '--coordinator_address' in line


def test_process_0_whose_peers_never_come_is_one_line():
  code, out, seconds = cli(f'--coordinator_address=localhost:{free_port()}', '--distributed_timeout=3',
                           MMFUSION_NUM_PROCESSES='2', MMFUSION_PROCESS_ID='0')
  line = one_line(out)
  assert code == 1 and seconds < 60
  assert 'process 0 of 2 could not start the distributed runtime within 3 s' in line
  assert 'MMFUSION_NUM_PROCESSES' in line and '--distributed_timeout' in line


def test_a_coordinator_port_in_use_is_one_line():
  with socket.socket() as taken:   # JAX would segfault binding it
    taken.bind(('', 0))
    taken.listen()
    port = taken.getsockname()[1]
    code, out, _ = cli(f'--coordinator_address=localhost:{port}', '--num_processes=2',
                       '--process_id=0')
  line = one_line(out)
  assert code == 1 and f'port {port}' in line and 'already in use' in line


def test_initialize_after_jax_started_says_so():
  script = textwrap.dedent('''
      import jax
      from mmfusion import distributed
      jax.devices()
      try:
        distributed.initialize('localhost:1', 2, 1)
      except distributed.DistributedError as e:
        print('ERROR', e)
  ''')
  run = subprocess.run([sys.executable, '-c', script], env=clean_env(), capture_output=True,
                       text=True, timeout=60)
  assert 'ERROR jax.distributed must start before anything uses a JAX device' in run.stdout, (
      run.stdout + run.stderr)


# ----------------------------------------------------------------------------- real runs

COLLECTIVE = '''
from mmfusion import distributed
assert distributed.initialize()   # from the MMFUSION_* variables the launcher sets
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
assert jax.process_count() == 2, jax.process_count()
assert jax.device_count() == 4 and jax.local_device_count() == 2
mesh = Mesh(np.array(jax.devices()), ('data',))
local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()   # [0, 1] and [10, 11]
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(f'process {jax.process_index()} sum {float(total):g} primary {distributed.is_primary()}')
'''


def launch(tmp_path, script, *options, **popen):
  path = tmp_path / 'script.py'
  path.write_text(textwrap.dedent(script))
  cmd = [os.path.join(LAUNCH, 'local_multiprocess.sh'), *options, '--', sys.executable, str(path)]
  return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def test_two_processes_sum_across_processes(tmp_path):
  proc = launch(tmp_path, COLLECTIVE, '-n', '2', '-d', '2')
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert '[p0] process 0 sum 22 primary True' in out.splitlines(), out
  assert '[p1] process 1 sum 22 primary False' in out.splitlines(), out


def test_slurm_step_is_detected(tmp_path):
  """Two tasks of a (simulated) one-node srun step find each other through JAX's SLURM
  detection: no MMFUSION_* variables, the coordinator on the node list's first host."""
  path = tmp_path / 'script.py'
  path.write_text(COLLECTIVE.replace('launcher', 'SLURM step'))
  env = clean_env(XLA_FLAGS=xla_flags(2), SLURM_JOB_ID='4242',
                  SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2', SLURM_STEP_NUM_NODES='1',
                  JAX_COORDINATOR_PORT=str(free_port()))
  procs = [subprocess.Popen([sys.executable, str(path)], env=dict(env, SLURM_PROCID=str(i),
                                                                  SLURM_LOCALID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f'process {i} sum 22' in out, out


def test_one_failing_process_stops_the_others(tmp_path):
  pid_file = tmp_path / 'pid0'
  proc = launch(tmp_path, f'''
      import os, pathlib, sys, time
      pid_file = pathlib.Path({str(pid_file)!r})
      if os.environ['MMFUSION_PROCESS_ID'] == '0':
        pid_file.write_text(str(os.getpid()))
        time.sleep(300)   # would wait for process 1 for ever
      while not pid_file.exists():   # fail once process 0 is surely running
        time.sleep(0.05)
      sys.exit(3)
  ''', '-n', '2')
  start = time.monotonic()
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 3 and time.monotonic() - start < 30, out
  assert 'process 1 exited with code 3: stopping the others' in out
  with pytest.raises(ProcessLookupError):   # process 0 is gone too
    os.kill(int(pid_file.read_text()), 0)


def test_ctrl_c_reaches_every_process_once(tmp_path):
  """A terminal's Ctrl-C signals the whole foreground group; each process must see it once,
  and be left to finish (the trainer stops without its checkpoint at a second signal)."""
  proc = launch(tmp_path, '''
      import os, signal, sys, time
      seen = []
      signal.signal(signal.SIGINT, lambda *_: seen.append('INT'))
      print('ready', flush=True)
      deadline = time.time() + 30
      while not seen and time.time() < deadline:
        time.sleep(0.05)
      # "Checkpointing", process 1 for longer: a second signal would arrive now, or a
      # SIGTERM once process 0 has exited with 130 like the trainer.
      time.sleep(0.5 + int(os.environ['MMFUSION_PROCESS_ID']))
      print('signals', seen, flush=True)
      sys.exit(130)
  ''', '-n', '2', start_new_session=True,
      # As from a terminal. A job started in the background of a non-interactive shell
      # (`nohup ... &`, some CI runners) inherits SIGINT ignored, and bash cannot trap a
      # signal that was ignored when it started.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  ready = 0
  lines = []
  while ready < 2:
    line = proc.stdout.readline()
    assert line, ''.join(lines)
    lines.append(line)
    ready += line.rstrip().endswith('ready')
  os.killpg(proc.pid, signal.SIGINT)
  out = ''.join(lines) + proc.communicate(timeout=60)[0]
  assert proc.returncode == 130, out
  for i in range(2):
    assert f"[p{i}] signals ['INT']" in out, out
  assert 'stopping the others' not in out


# ----------------------------------------------------------------------------- scripts

def test_flags_without_importing_jax():
  """`--help` stays instant: the flags are there, and mmfusion.distributed imports JAX only
  when initialize() runs."""
  run = subprocess.run([sys.executable, '-m', 'mmfusion.main', '--help'], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=60)
  for flag in ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids',
               'distributed_timeout'):
    assert f'--{flag}' in run.stdout + run.stderr
  run = subprocess.run([sys.executable, '-c', 'import sys, mmfusion.main; '
                        'assert "jax" not in sys.modules, "imported jax"'],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_parse(script):
  run = subprocess.run(['bash', '-n', os.path.join(LAUNCH, script)], capture_output=True,
                       text=True)
  assert run.returncode == 0, run.stderr


def test_tpu_pod_dry_run_prints_the_gcloud_command():
  args = ['--config', 'configs/shapes_clip.py', '--workdir', 'gs://bucket/run 1',
          "--config.name=it's", '$HOME']
  run = subprocess.run([os.path.join(LAUNCH, 'tpu_pod.sh'), 'my-pod', 'us-central2-b',
                        '--project', 'my-project', '--setup', '--dry-run', '--', *args],
                       env=dict(os.environ, MMFUSION_REMOTE_DIR='~/code/mmfusion'),
                       capture_output=True, text=True, timeout=10)
  assert run.returncode == 0, run.stderr
  setup, train = [shlex.split(line) for line in run.stdout.splitlines()]
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod', '--zone', 'us-central2-b',
         '--project', 'my-project', '--worker=all', '--command']
  assert setup[:-1] == ssh and train[:-1] == ssh
  assert shlex.split(setup[-1]) == ['cd', '~/code/mmfusion', '&&', 'python3', '-m', 'pip',
                                    'install', '-e', '.']
  # What each worker's shell runs: every argument arrives as it was given.
  assert shlex.split(train[-1]) == ['cd', '~/code/mmfusion', '&&', 'python3', '-m',
                                    'mmfusion.main', *args]


def test_sbatch_xla_flags_exist():
  """Every XLA flag the sbatch script names, commented out or not, is one this jaxlib knows
  (XLA stops at start-up on an unknown flag)."""
  text = open(os.path.join(LAUNCH, 'slurm_gpu.sbatch')).read()
  block = text[text.index('xla_flags=('):text.index('\n)', text.index('xla_flags=('))]
  flags = re.findall(r'^\s*#?\s*(--xla_\S+)', block, re.M)
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags and len(flags) >= 5
  run = subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.zeros(1).block_until_ready()'],
                       env=clean_env(XLA_FLAGS=' '.join(flags)), capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'srun' in text and 'python -m mmfusion.main --config "$CONFIG" --workdir "$WORKDIR"' in text
