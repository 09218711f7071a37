"""``make demo``: the Lambda burst that breaks direct Postgres connections, absorbed by pgbroker.

Run ``python -m demo --help``; `demo.cli` is the entry point, `demo.run` serves ``make run``.
"""
