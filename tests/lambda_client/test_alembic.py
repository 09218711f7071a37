"""Alembic migrations through the ``postgresql+pgbroker`` dialect, against a real broker and
Postgres: ``upgrade head`` and ``downgrade base`` with the env.py ``alembic init`` writes
(one transaction per run, DDL included), the version table kept in between. (Alembic's own
compliance suite runs in ``make sqlalchemy-suite``.)"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from devtools.brokerproc import BrokerProcess
from tests.support import connect

SUFFIX = uuid.uuid4().hex[:8]
ACCOUNTS = f"alembic_accounts_{SUFFIX}"
VERSIONS = f"alembic_version_{SUFFIX}"

FIRST = f'''
"""accounts"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.create_table(
        "{ACCOUNTS}",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(50), nullable=False),
    )
    op.bulk_insert(
        sa.table("{ACCOUNTS}", sa.column("id", sa.Integer), sa.column("owner", sa.String)),
        [{{"id": 1, "owner": "ada"}}, {{"id": 2, "owner": "50% bob"}}],
    )


def downgrade():
    op.drop_table("{ACCOUNTS}")
'''

SECOND = f'''
"""balance, an index and a check"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.add_column("{ACCOUNTS}", sa.Column("balance", sa.Numeric(12, 2), server_default="0"))
    op.create_index("ix_{ACCOUNTS}_owner", "{ACCOUNTS}", ["owner"], unique=True)
    op.create_check_constraint("ck_{ACCOUNTS}_balance", "{ACCOUNTS}", "balance >= 0")
    op.alter_column("{ACCOUNTS}", "owner", type_=sa.String(100))


def downgrade():
    op.alter_column("{ACCOUNTS}", "owner", type_=sa.String(50))
    op.drop_constraint("ck_{ACCOUNTS}_balance", "{ACCOUNTS}")
    op.drop_index("ix_{ACCOUNTS}_owner", "{ACCOUNTS}")
    op.drop_column("{ACCOUNTS}", "balance")
'''

ENV = f"""
from alembic import context
from sqlalchemy import NullPool, create_engine

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection, target_metadata=None, version_table="{VERSIONS}"
    )
    with context.begin_transaction():
        context.run_migrations()
"""


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable", pool_size=2, auth="none", shutdown_grace=2
    ) as process:
        assert process.wait_serving(30)
        yield process


@pytest.fixture
def alembic_config(tmp_path: Path, broker: BrokerProcess, postgres: Any) -> Iterator[Config]:
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(textwrap.dedent(ENV))
    (tmp_path / "script.py.mako").write_text("")
    (tmp_path / "versions" / "0001_accounts.py").write_text(FIRST)
    (tmp_path / "versions" / "0002_balance.py").write_text(SECOND)
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    url = f"postgresql+pgbroker://{broker.target}/{postgres.database}"
    config.set_main_option("sqlalchemy.url", url)
    yield config
    admin = connect(postgres)
    admin.run(f"DROP TABLE IF EXISTS {ACCOUNTS}")
    admin.run(f"DROP TABLE IF EXISTS {VERSIONS}")
    admin.close()


def columns(postgres: Any) -> dict[str, str]:
    admin = connect(postgres)
    try:
        rows = admin.run(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = :t ORDER BY ordinal_position",
            t=ACCOUNTS,
        )
    finally:
        admin.close()
    return {name: kind for name, kind in rows}


def version(postgres: Any) -> list[str]:
    admin = connect(postgres)
    try:
        return [row[0] for row in admin.run(f"SELECT version_num FROM {VERSIONS}")]
    finally:
        admin.close()


def test_upgrade_to_head_and_downgrade_to_base(alembic_config: Config, postgres: Any) -> None:
    command.upgrade(alembic_config, "head")
    assert columns(postgres) == {
        "id": "integer",
        "owner": "character varying",
        "balance": "numeric",
    }
    assert version(postgres) == ["0002"]
    admin = connect(postgres)
    try:
        assert admin.run(f"SELECT owner, balance FROM {ACCOUNTS} ORDER BY id") == [
            ["ada", Decimal("0.00")],
            ["50% bob", Decimal("0.00")],
        ]
    finally:
        admin.close()

    command.downgrade(alembic_config, "0001")
    assert columns(postgres) == {"id": "integer", "owner": "character varying"}
    assert version(postgres) == ["0001"]

    command.downgrade(alembic_config, "base")
    assert columns(postgres) == {}
    assert version(postgres) == []


def test_a_failing_migration_rolls_back_its_ddl(alembic_config: Config, postgres: Any) -> None:
    """Postgres' transactional DDL through the broker: the first revision's table is gone
    when the second fails (a unique index over duplicate owners)."""
    script_dir = Path(alembic_config.get_main_option("script_location") or "")
    broken = SECOND.replace('["owner"], unique=True', '["id"], unique=True').replace(
        '"balance >= 0"', '"balance < 0"'
    )
    (script_dir / "versions" / "0002_balance.py").write_text(broken)
    with pytest.raises(Exception, match="check constraint"):
        command.upgrade(alembic_config, "head")
    assert columns(postgres) == {}
