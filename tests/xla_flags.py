"""XLA flags for the test session and the subprocesses its tests start."""
import os
import subprocess
import sys

# Unoptimised XLA CPU code: less compile time, which is most of a test's time. Measured
# 2026-12-06: the whole suite took 14 min 18 s with these flags and 19 min 30 s without the
# first; test_fused_model + test_decoder 177 s of CPU at level 1 against 140 s at 0. The price
# is code that runs several times slower (PGD attack steps 10x), so a test that executes much
# (an attack, a long decode) keeps its inputs small. No test measures speed.
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')
# XLA:CPU's older loop emitters instead of its MLIR fusion emitters: about a third less backend
# compile time per program (a CLIP train step 2.6 -> 1.7 s) and the same test results; the
# suite took 18 min 05 s without and 14 min 46 s with it (2026-12-06). A newer flag than the
# others, and XLA aborts on a flag it does not know: kept only where this jaxlib accepts it.
FAST_COMPILE_IF_KNOWN = ('--xla_cpu_use_fusion_emitters=false',)
_DEVICE_COUNT = '--xla_force_host_platform_device_count'


def accepted(flag: str) -> bool:
  """Whether this jaxlib starts with `flag` in XLA_FLAGS (a child process: ~1 s)."""
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                         capture_output=True)
  return probe.returncode == 0


def session_flags(current: str) -> str:
  """`current` XLA_FLAGS with FAST_COMPILE added, and those of FAST_COMPILE_IF_KNOWN that this
  jaxlib accepts; a flag `current` already sets (any value) is left as it is."""
  flags = current.split()
  names = {f.split('=')[0] for f in flags}
  for flag in FAST_COMPILE + FAST_COMPILE_IF_KNOWN:
    if flag.split('=')[0] in names:
      continue
    if flag in FAST_COMPILE or accepted(flag):
      flags.append(flag)
      names.add(flag.split('=')[0])
  return ' '.join(flags)


def xla_flags(devices: int | None = None) -> str:
  """This session's XLA_FLAGS with `devices` simulated CPU devices (None: no device count)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT)]
  if devices is not None:
    flags.append(f'{_DEVICE_COUNT}={devices}')
  return ' '.join(flags)
