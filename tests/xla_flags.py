"""XLA flags for the test session and the subprocesses its tests start."""
import os

# Unoptimised XLA CPU code: about 30% less compile time, which is most of a test's time, and the
# tests' models are too small for the speed of the compiled code to matter. No test measures speed.
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')
_DEVICE_COUNT = '--xla_force_host_platform_device_count'


def xla_flags(devices: int | None = None) -> str:
  """This session's XLA_FLAGS with `devices` simulated CPU devices (None: no device count)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT)]
  if devices is not None:
    flags.append(f'{_DEVICE_COUNT}={devices}')
  return ' '.join(flags)
