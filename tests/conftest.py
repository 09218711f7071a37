"""The root conftest: every fixture comes from the `tests.fixtures` plugins, so each test
folder sees the same Postgres and broker fixtures (see `tests.fixtures` for the list).

Every test folder is a package (``__init__.py`` down from ``tests/``), so a test module is
imported by its full name (``tests.broker.front.test_bad_input``) and two files with the same
name in different folders cannot collide; only the repository root goes on ``sys.path``, so a
test folder named like a real package (``tests/broker``) never shadows it.
"""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.brokers",
    "tests.fixtures.aws",
]
