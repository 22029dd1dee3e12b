import os
import pathlib
import shutil
import sys
import tempfile

# One persistent XLA compilation cache for the whole test session, shared with
# the training subprocesses the tests start: the same tiny programs are
# compiled once instead of in every run (XLA:CPU compiles are slow here). A
# cache made here is removed when the session ends (pytest_unconfigure).
SESSION_CACHE_DIR = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  SESSION_CACHE_DIR = tempfile.mkdtemp(prefix='selfreg_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = SESSION_CACHE_DIR
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The tests' programs are tiny and compiled once or twice each, so LLVM's
# optimisations cost more than they save: at level 0 the compile-bound tests
# run about 30% faster (measured). Subprocesses inherit the flag; tests that
# set XLA_FLAGS for a subprocess append to it.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0'])

# Tests import the project's packages (selfreg_jax, data_prep, configs) and the
# shared tiny configurations from the checkout, without installation.
ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / 'tests'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

from selfreg_jax.common import runtime

# What the entry points set (the classic threefry scheme, ...), here for the
# library code the tests run in this process and the processes they start.
runtime.configure_libraries()


# The umask the file-mode tests run under unless they choose one: the group
# may read what is written, others may not (mkstemp's 0o600 would fail).
TEST_UMASK = 0o027


@pytest.fixture
def umask(request):
  """Sets the process umask (TEST_UMASK or the test's indirect parameter)
  for the test, restores the old one after it, and yields the one set."""
  mask = getattr(request, 'param', TEST_UMASK)
  previous = os.umask(mask)
  yield mask
  os.umask(previous)


@pytest.fixture(scope='session')
def tiny_demo_data_dir(tmp_path_factory):
  """A TFDS data dir holding a tiny synthetic demo set (built once)."""
  from data_prep import build  # pylint: disable=g-import-not-at-top
  import tiny_train_config  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  build.build_dataset('demo', data_dir=data_dir,
                      **tiny_train_config.DEMO_OPTIONS)
  return data_dir


def pytest_unconfigure(config):
  del config  # unused
  if SESSION_CACHE_DIR is not None:
    shutil.rmtree(SESSION_CACHE_DIR, ignore_errors=True)
