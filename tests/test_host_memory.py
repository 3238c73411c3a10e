"""The host-memory setting (mmfusion/host_memory.py): an entry point restarts itself in place with
glibc's huge-page tunable, after which a program whose temporaries are far past glibc's mmap
threshold faults them in 2 MiB at a time; with glibc's defaults (`MMFUSION_HOST_MALLOC=system`)
every call faults in every 4 KiB page anew. Page faults counted with getrusage, in fresh
processes: the setting is process-wide and is taken at a process's start."""
import json
import os
import subprocess
import sys

import pytest

from mmfusion import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLER_TUNABLES = 'glibc.malloc.tcache_count=7'    # glibc's default value: changes nothing

# An entry point: says its pid, calls ensure_huge_pages, then runs a program with one 128 MiB
# temporary (y: [8192, 4096] float32, read by a dot and a reduction, so it is materialised) and
# counts the minor page faults of its calls after the first.
CALLS = 8
_ENTRY_POINT = r'''
import json, os, resource, sys
from mmfusion import host_memory
print(json.dumps({'pid': os.getpid()}))
line = host_memory.ensure_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((8192, 64)); w1 = jnp.ones((64, 4096)); w2 = jnp.ones((4096, 8))
def program(x, w1, w2):
  y = jnp.tanh(x @ w1)
  return (y @ w2).sum() + y.max(axis=0).sum()
step = jax.jit(program)
temp = step.lower(x, w1, w2).compile().memory_analysis().temp_size_in_bytes
step(x, w1, w2).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[1]) - 1):
  step(x, w1, w2).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({'pid': os.getpid(), 'line': line, 'temp_pages': temp / 4096, 'faults': faults,
                  'tunables': os.environ.get('GLIBC_TUNABLES'),
                  'marker': os.environ.get('MMFUSION_CALLER_GLIBC_TUNABLES')}))
'''


def _run(policy: str) -> list[dict]:
  env = dict(os.environ, MMFUSION_HOST_MALLOC=policy, GLIBC_TUNABLES=CALLER_TUNABLES)
  done = subprocess.run([sys.executable, '-c', _ENTRY_POINT, str(CALLS)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]


@pytest.mark.skipif(host_memory.unavailable() is not None,
                    reason=f'no huge pages here: {host_memory.unavailable()}')
def test_the_restarted_process_faults_its_temporaries_in_as_huge_pages():
  system, restarted = _run('system'), _run('huge_pages')
  # glibc's defaults: no restart (one start line), and every 4 KiB page faulted in per call.
  assert len(system) == 2, system
  system = system[-1]
  assert system['temp_pages'] >= 128 * 2**20 / 4096          # past glibc's 32 MiB mmap limit
  assert system['faults'] >= 0.9 * (CALLS - 1) * system['temp_pages'], system
  assert 'MMFUSION_HOST_MALLOC=system' in system['line']
  # Restarted in place: the start line twice from one pid, then 2 MiB faults. Not 1/512 of the
  # pages: the block's unaligned ends and the program's smaller buffers still fault 4 KiB at a
  # time (measured: 2-8% of the default's faults).
  start, again, result = restarted
  assert start['pid'] == again['pid'] == result['pid']
  assert 'huge pages' in result['line'], result
  assert result['faults'] <= 0.25 * (CALLS - 1) * result['temp_pages'], result
  # The caller's environment is back for whatever the process starts next.
  assert result['tunables'] == CALLER_TUNABLES and result['marker'] is None


def test_an_unknown_policy_is_one_error_naming_the_variable(monkeypatch):
  monkeypatch.setattr(host_memory, '_outcome', None)
  monkeypatch.setenv('MMFUSION_HOST_MALLOC', 'big')
  with pytest.raises(ValueError, match=r"MMFUSION_HOST_MALLOC='big': expected one of "
                                       r"huge_pages, system"):
    host_memory.ensure_huge_pages()
  run = subprocess.run([sys.executable, '-m', 'mmfusion.main', '--help'], cwd=ROOT,
                       env=dict(os.environ, MMFUSION_HOST_MALLOC='big'), capture_output=True,
                       text=True, timeout=60)
  assert run.returncode != 0
  assert run.stderr.strip().splitlines() == [
      "mmfusion: MMFUSION_HOST_MALLOC='big': expected one of huge_pages, system."]


def test_no_restart_where_the_caller_chose_already_or_huge_pages_are_off(monkeypatch, tmp_path):
  monkeypatch.setattr(host_memory.os, 'execv', lambda *a: pytest.fail('restarted'))
  monkeypatch.delenv('MMFUSION_CALLER_GLIBC_TUNABLES', raising=False)
  monkeypatch.setenv('MMFUSION_HOST_MALLOC', 'huge_pages')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')          # the caller's choice
  monkeypatch.setattr(host_memory, '_outcome', None)
  assert 'already sets glibc.malloc.hugetlb' in host_memory.ensure_huge_pages()
  assert host_memory.ensure_huge_pages() == host_memory.outcome()        # asked again: same

  monkeypatch.delenv('GLIBC_TUNABLES')
  never = tmp_path / 'enabled'
  never.write_text('always madvise [never]\n')
  assert host_memory.huge_pages_mode(str(never)) == 'never'
  assert host_memory.huge_pages_mode(str(tmp_path / 'absent')) is None
  monkeypatch.setattr(host_memory, 'THP_ENABLED', str(never))
  monkeypatch.setattr(host_memory, 'glibc_version', lambda: (2, 36))
  monkeypatch.setattr(host_memory, '_outcome', None)
  assert 'transparent huge pages are off' in host_memory.ensure_huge_pages()

  monkeypatch.setattr(host_memory, 'glibc_version', lambda: (2, 31))
  monkeypatch.setattr(host_memory, '_outcome', None)
  assert 'needs glibc >= 2.35' in host_memory.ensure_huge_pages()
