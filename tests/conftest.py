"""Settings shared by the test files.

`make test` runs ``pytest -n 2 --dist loadfile``: each file goes whole to one of two workers,
in collection order.  The slowest files are moved to the front so that the many short files
fill in around them, instead of one long file starting last and running alone at the end.

The run shares one jax persistent compilation cache (a temporary directory, removed at the
end) between its two workers and the scripts the tests start: most of the suite's time is XLA
compiling the same tiny-model programs again in another process or from another ``jax.jit``
of the same function.  ``DIT_QUANT_JAX_TEST_NO_XLA_CACHE=1`` turns it off.

Off a GPU the run (workers and the processes tests start, through the environment) also
compiles with LLVM's cheap pipeline (tests/fast_compile.py: about a third off the suite's time);
``DIT_QUANT_JAX_TEST_FULL_XLA_OPT=1`` keeps XLA's default optimization.
"""

import os
import shutil
import tempfile

from fast_compile import has_nvidia_gpu, with_fast_compile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWNED_CACHE = []


def pytest_configure(config):
  del config
  if os.environ.get("PYTEST_XDIST_WORKER"):
    return  # workers inherit the controller's settings through the environment
  if os.environ.get("DIT_QUANT_JAX_TEST_FULL_XLA_OPT") != "1" and not has_nvidia_gpu():
    os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))
  if os.environ.get("DIT_QUANT_JAX_TEST_NO_XLA_CACHE") == "1":
    return
  if os.environ.get(_CACHE_ENV):
    return  # the caller's own cache
  directory = tempfile.mkdtemp(prefix="dit_quant_jax_tests_xla_cache_")
  _OWNED_CACHE.append(directory)
  os.environ[_CACHE_ENV] = directory
  # Every compile above 0.1 s gets an entry (jax's default, 1 s, would skip most of the
  # tiny model's programs).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


def pytest_unconfigure(config):
  del config
  while _OWNED_CACHE:
    shutil.rmtree(_OWNED_CACHE.pop(), ignore_errors=True)

_SLOW_FIRST = ("test_multiprocess.py", "test_pipeline.py", "test_hqdit.py", "test_bench.py",
               "test_trainer.py", "test_integrity.py", "test_kernel_integration.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
