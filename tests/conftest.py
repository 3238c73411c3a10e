"""Test-wide settings: quiet TensorFlow, CPU only, deterministic XLA, one compilation cache."""
import os
import shutil
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# One persistent XLA compilation cache for the session, inherited by the CLI subprocesses the
# tests start: many of them compile the same train step and evaluators (a run and its resume,
# one process and two), and on CPU compiling is most of a short run. A cache hit gives the
# same executable, so no result changes. Set before any test module imports jax.
_XLA_CACHE = tempfile.mkdtemp(prefix='mmfusion-test-xla-cache-')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _XLA_CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

# `configs/` is a directory of experiment files, not a package on the path; tests import them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)
