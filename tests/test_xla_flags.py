"""The test session's XLA flags (tests/xla_flags.py): the fast-compile flags are added, a flag
the caller set is kept, and a flag this jaxlib does not know is left out instead of aborting
every test (XLA stops the process on an unknown flag)."""
import xla_flags
from xla_flags import FAST_COMPILE, accepted, session_flags


def test_session_flags_add_the_missing_ones_and_keep_what_the_caller_set():
  flags = session_flags('--xla_backend_optimization_level=2 --xla_dump_to=/tmp/x').split()
  assert '--xla_backend_optimization_level=2' in flags and '--xla_dump_to=/tmp/x' in flags
  assert '--xla_backend_optimization_level=0' not in flags
  assert set(FAST_COMPILE) - {'--xla_backend_optimization_level=0'} <= set(flags)


def test_a_flag_this_jaxlib_does_not_know_is_left_out(monkeypatch):
  assert accepted('--xla_backend_optimization_level=0')
  assert not accepted('--xla_mmfusion_no_such_flag=1')
  monkeypatch.setattr(xla_flags, 'FAST_COMPILE_IF_KNOWN',
                      ('--xla_mmfusion_no_such_flag=1', '--xla_backend_optimization_level=1'))
  flags = session_flags('').split()
  assert '--xla_mmfusion_no_such_flag=1' not in flags
  assert '--xla_backend_optimization_level=0' in flags                # FAST_COMPILE came first
  assert '--xla_backend_optimization_level=1' not in flags            # same name: not twice
