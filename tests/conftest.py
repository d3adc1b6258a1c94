"""Settings shared by the test files.

`make test` runs ``pytest -n 2 --dist loadfile``: each file goes whole to one of two workers,
in collection order.  The slowest files are moved to the front so that the many short files
fill in around them, instead of one long file starting last and running alone at the end.
"""

_SLOW_FIRST = ("test_multiprocess.py", "test_pipeline.py", "test_hqdit.py", "test_bench.py",
               "test_trainer.py", "test_integrity.py", "test_kernel_integration.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
