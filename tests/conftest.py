"""The root conftest: every fixture comes from the `tests.fixtures` plugins, so each test
folder sees the same Postgres and broker fixtures (see `tests.fixtures` for the list).

Test files are imported with ``--import-mode=importlib`` (pyproject.toml), under names made
from their paths, so equal file names in two folders cannot collide; the ``pythonpath``
setting puts the repository root on ``sys.path`` for ``tests.support`` and these plugins (see
tests/__init__.py for why the test folders are not packages).
"""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.brokers",
    "tests.fixtures.aws",
    "tests.fixtures.replicas",
]
