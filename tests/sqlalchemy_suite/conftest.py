"""Bootstraps SQLAlchemy's pytest plugin for the dialect compliance suites (SQLAlchemy's
``sqlalchemy.testing.suite`` and Alembic's ``alembic.testing.suite``), as SQLAlchemy's
README.dialects.rst describes.

This folder is its own pytest root (``-c tests/sqlalchemy_suite/setup.cfg``): the main suite's
fixture plugins are not loaded here, and the main suite ignores this folder. The dialect is
registered here as well as through the ``sqlalchemy.dialects`` entry point, so a checkout whose
client was installed before the entry point existed still finds it.
"""

import sys
from pathlib import Path

import pytest
from sqlalchemy.dialects import registry

# `requirement_cls = requirements:Requirements` (setup.cfg) is imported by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

registry.register("postgresql.pgbroker", "lambda_client.sqlalchemy", "PGDialect_pgbroker")

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin import plugin_base  # noqa: E402
from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402, F403
from sqlalchemy.testing.plugin.pytestplugin import (  # noqa: E402
    pytest_addoption as _sqla_addoption,
)
from sqlalchemy.testing.plugin.pytestplugin import (  # noqa: E402
    pytest_configure as _sqla_configure,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    _sqla_addoption(parser)
    # SQLAlchemy's own --requirements imports the class while options are parsed, before its
    # plugin has set up its fixtures; Alembic's requirements import its fixtures module, which
    # then lacks them ("fixture 'connection' not found"). This option only replaces the name
    # read from setup.cfg, imported at session start like the default.
    parser.addoption(
        "--requirements-class",
        help="module:Class of the suite requirements, instead of setup.cfg's requirement_cls",
    )


def pytest_configure(config: pytest.Config) -> None:
    _sqla_configure(config)
    if name := config.getoption("requirements_class"):
        plugin_base.file_config.set("sqla_testing", "requirement_cls", name)
