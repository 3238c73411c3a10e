"""Test-wide settings: quiet TensorFlow, CPU only, fast-compiling XLA; `configs/` importable."""
import os
import sys

from xla_flags import FAST_COMPILE

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Set before any test module imports jax. CLI subprocesses inherit it, and tests that simulate
# devices keep it (`xla_flags.xla_flags(devices)`).
_flags = os.environ.get('XLA_FLAGS', '').split()
os.environ['XLA_FLAGS'] = ' '.join(_flags + [f for f in FAST_COMPILE if f not in _flags])

# `configs/` is a directory of experiment files, not a package on the path; tests import them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
