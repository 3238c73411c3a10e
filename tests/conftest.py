"""Test-wide settings: quiet TensorFlow, CPU only, fast-compiling XLA, a session directory with
a compilation cache, the slowest files first; `configs/` importable; the tiny dataset's fixtures."""
import os
import shutil
import sys
import tempfile

from xla_flags import session_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Set before anything imports jax. CLI subprocesses inherit it, and tests that simulate devices
# keep it (`xla_flags.xla_flags(devices)`). Worked out once, in pytest's controller process: the
# xdist workers inherit the result.
_SESSION_FLAGS_SET = 'MMFUSION_TEST_XLA_FLAGS_SET'
if not os.environ.get(_SESSION_FLAGS_SET):
  os.environ['XLA_FLAGS'] = session_flags(os.environ.get('XLA_FLAGS', ''))
  os.environ[_SESSION_FLAGS_SET] = '1'

# `configs/` is a directory of experiment files, not a package on the path; tests import them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from cli_runs import SESSION_DIR  # noqa: E402
from tiny_data import make_config  # noqa: E402


def pytest_configure(config):
  """The session's own directory, made by the controller before it starts the xdist workers,
  which inherit the variables: the shared runs (tests/shared_runs.py) and one persistent XLA
  compilation cache, so that a program compiled once in the session (by a test, a CLI run, a
  resumed run, a second process) is read back instead of compiled again."""
  if not os.environ.get(SESSION_DIR):
    os.environ[SESSION_DIR] = config._mmfusion_session_dir = tempfile.mkdtemp(
        prefix='mmfusion-tests-')
    os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                          os.path.join(os.environ[SESSION_DIR], 'xla_cache'))
    # Every program, not only those that compile in over a second (jax's default): a CLI run's
    # many small ones (init, evaluation, resharding) are compiled again by each later launch of
    # the same config (test_faults.py alone: 171 -> 164 s, 2026-12-06).
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


def pytest_unconfigure(config):
  if getattr(config, '_mmfusion_session_dir', None):
    shutil.rmtree(config._mmfusion_session_dir, ignore_errors=True)


# The files that take longest (worker seconds, measured on 2 cores, 2026-12-06), run first: the
# two xdist workers take whole files in this order, so the last files to run are short ones and
# both workers end together instead of one idling while the other finishes a long file. (xdist's
# own reordering, by number of tests, is off in pytest.ini: it put the few-but-slow CLI files
# last.) Files not listed follow in their usual order.
SLOWEST_FILES = (
    'test_end_to_end.py', 'test_notebooks.py', 'test_faults.py', 'test_scaleout.py',
    'test_adversarial.py', 'test_fused_model.py', 'test_models.py', 'test_fused_end_to_end.py',
    'test_accumulation.py', 'test_speech_fusion.py', 'test_benchmarks.py',
    'test_import_weights.py', 'test_speech_end_to_end.py', 'test_decoder.py', 'test_api.py',
    'test_audio_tower.py', 'test_pooled_encoder.py', 'test_peft.py', 'test_speech_data.py',
    'test_fourth_modality.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: keeps the rest


# -- the tiny dataset of the data tests (a module that needs another defines its own data_dir) --
# jax and TensorFlow are imported inside the fixtures: a module-level import here would load
# them in pytest's controller process too, before any test needs them.

@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  from mmfusion.data import sources
  directory = tmp_path_factory.mktemp('datasets')
  sources.get_builder(make_config(directory).data)
  return directory


@pytest.fixture
def config(data_dir):
  return make_config(data_dir)


@pytest.fixture
def source(config):
  """The tiny dataset as a run sees it (data.sources.Source of `config`)."""
  from mmfusion.data import sources
  return sources.Source(config)


@pytest.fixture(scope='session')
def tok(data_dir):
  from mmfusion.data import sources
  return sources.Source(make_config(data_dir)).tokenizer


@pytest.fixture(scope='session')
def sharding():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, P('data'))
