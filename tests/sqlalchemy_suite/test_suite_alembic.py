"""Alembic's dialect compliance suite, from the installed wheel."""

from alembic.testing.suite import *  # noqa: F403
