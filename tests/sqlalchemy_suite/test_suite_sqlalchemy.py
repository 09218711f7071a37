"""SQLAlchemy's dialect compliance suite, from the installed wheel (README.dialects.rst)."""

from sqlalchemy.testing.suite import *  # noqa: F403
