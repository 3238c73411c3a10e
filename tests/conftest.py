"""Test-wide settings: quiet TensorFlow, CPU only, deterministic XLA."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import sys

# `configs/` is a directory of experiment files, not a package on the path; tests import them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
