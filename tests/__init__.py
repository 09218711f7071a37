"""pgbroker's test suite. A regular package, so ``tests.support`` and ``tests.fixtures`` are
this folder's even if some installed distribution ships a top-level ``tests``.

The folders below mirror the code (``tests/broker/front`` …, ``tests/lambda_client``) and have
no ``__init__.py`` on purpose: as packages they would shadow the real ``broker`` and
``lambda_client`` whenever ``tests/`` is on ``sys.path`` (``python -m pytest`` run from here).
pytest imports test files with ``--import-mode=importlib`` under names made from their paths,
so two files with the same name in different folders cannot collide.
"""
