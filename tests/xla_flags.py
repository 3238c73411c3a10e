"""XLA flags for the test session and the subprocesses its tests start."""
import os

# Unoptimised XLA CPU code: less compile time, which is most of a test's time. Measured
# 2026-12-06: the whole suite took 14 min 18 s with these flags and 19 min 30 s without the
# first; test_fused_model + test_decoder 177 s of CPU at level 1 against 140 s at 0. The price
# is code that runs several times slower (PGD attack steps 10x), so a test that executes much
# (an attack, a long decode) keeps its inputs small. No test measures speed.
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')
_DEVICE_COUNT = '--xla_force_host_platform_device_count'


def xla_flags(devices: int | None = None) -> str:
  """This session's XLA_FLAGS with `devices` simulated CPU devices (None: no device count)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT)]
  if devices is not None:
    flags.append(f'{_DEVICE_COUNT}={devices}')
  return ' '.join(flags)
