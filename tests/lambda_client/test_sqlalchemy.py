"""The ``postgresql+pgbroker`` dialect with SQLAlchemy's ORM in a Lambda-like handler, against a
real broker and Postgres: a relationship load, ``with_for_update``, a rollback on error, the
Lambda deadline as an execution option, per-transaction isolation, and the URL's checks.
(SQLAlchemy's own compliance suite runs in ``make sqlalchemy-suite``.)"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, NullPool, String, create_engine, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from devtools.brokerproc import BrokerProcess
from devtools.lambda_context import FakeLambdaContext
from lambda_client import dbapi
from lambda_client.sqlalchemy import PGDialect_pgbroker
from lambda_client.sqlalchemy._url import connect_args_from_url
from tests.support import connect

SUFFIX = uuid.uuid4().hex[:8]


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = f"sa_customers_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    orders: Mapped[list[Order]] = relationship(back_populates="customer", order_by="Order.id")


class Order(Base):
    __tablename__ = f"sa_orders_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey(f"{Customer.__tablename__}.id"))
    item: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int]
    customer: Mapped[Customer] = relationship(back_populates="orders")


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable", pool_size=3, auth="none", shutdown_grace=2
    ) as process:
        assert process.wait_serving(30)
        yield process


@pytest.fixture(scope="module")
def engine(broker: BrokerProcess, postgres: Any) -> Iterator[Engine]:
    """The engine a Lambda module would build once: NullPool, since the DB-API connection
    is free and the broker does the pooling."""
    engine = create_engine(
        f"postgresql+pgbroker://{broker.target}/{postgres.database}", poolclass=NullPool
    )
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


def handler(engine: Engine, event: dict[str, Any], context: FakeLambdaContext) -> dict[str, Any]:
    """Order *quantity* of *item* for *customer*; a quantity below 1 fails after the insert,
    so the whole unit of work rolls back."""
    with Session(engine.execution_options(lambda_context=context)) as session, session.begin():
        customer = session.scalars(
            select(Customer).where(Customer.name == event["customer"]).with_for_update()
        ).one()
        customer.orders.append(Order(item=event["item"], quantity=event["quantity"]))
        session.flush()
        if event["quantity"] < 1:
            raise ValueError("quantity must be at least 1")
        return {"orders": [(o.item, o.quantity) for o in customer.orders]}


def test_orm_session_in_a_handler_loads_a_relationship_and_locks_the_row(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        session.add(Customer(name="ada", orders=[Order(item="tea", quantity=2)]))
    answer = handler(
        engine, {"customer": "ada", "item": "cake", "quantity": 1}, FakeLambdaContext()
    )
    assert answer == {"orders": [("tea", 2), ("cake", 1)]}
    with Session(engine) as session:
        ada = session.scalars(select(Customer).where(Customer.name == "ada")).one()
        assert [(o.item, o.quantity) for o in ada.orders] == [("tea", 2), ("cake", 1)]


def test_with_for_update_blocks_a_second_transaction_until_the_first_ends(
    engine: Engine, postgres: Any
) -> None:
    with Session(engine) as session, session.begin():
        session.add(Customer(name="bob"))
    with Session(engine) as first, first.begin():
        first.scalars(select(Customer).where(Customer.name == "bob").with_for_update()).one()
        # A second transaction that will not wait sees the row locked (55P03).
        with pytest.raises(OperationalError) as caught, Session(engine) as second, second.begin():
            second.scalars(
                select(Customer).where(Customer.name == "bob").with_for_update(nowait=True)
            ).one()
        assert getattr(caught.value.orig, "sqlstate", None) == "55P03"


def test_an_error_in_the_handler_rolls_back_the_unit_of_work(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        session.add(Customer(name="cy"))
    with pytest.raises(ValueError, match="at least 1"):
        handler(engine, {"customer": "cy", "item": "x", "quantity": 0}, FakeLambdaContext())
    with Session(engine) as session:
        cy = session.scalars(select(Customer).where(Customer.name == "cy")).one()
        assert cy.orders == []


def test_a_constraint_violation_rolls_back_and_the_session_goes_on(engine: Engine) -> None:
    with Session(engine) as session:
        session.add(Customer(name="dee"))
        session.commit()
        session.add(Customer(name="dee"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        assert session.scalar(select(Customer.name).where(Customer.name == "dee")) == "dee"


def test_isolation_level_goes_with_the_transaction_not_the_session(engine: Engine) -> None:
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    with serializable.begin() as conn:
        assert conn.scalar(text("SHOW transaction_isolation")) == "serializable"
    with engine.begin() as conn:  # the pooled Postgres connection kept no session setting
        assert conn.scalar(text("SHOW transaction_isolation")) == "read committed"
    read_only = engine.execution_options(postgresql_readonly=True)
    with read_only.begin() as conn:
        assert conn.scalar(text("SHOW transaction_read_only")) == "on"


def test_autocommit_statements_and_reading_settings_need_no_lease(
    engine: Engine, broker: BrokerProcess
) -> None:
    client = dbapi.client_for(broker.target, {})
    before = client.stats()["leases_num"]
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn:
        assert conn.scalar(text("SELECT 41 + 1")) == 42
    with engine.connect() as conn:  # outside a transaction: one autocommit SHOW
        assert conn.get_isolation_level() == "READ COMMITTED"
        conn.rollback()
    assert client.stats()["leases_num"] == before


def test_an_expired_lambda_deadline_fails_the_statement(engine: Engine) -> None:
    late = FakeLambdaContext(remaining=0.01)
    with pytest.raises(DBAPIError), engine.execution_options(lambda_context=late).connect() as c:
        c.execute(text("SELECT pg_sleep(1)"))


def test_stream_results_uses_a_server_side_cursor(engine: Engine) -> None:
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=10).execute(
            text("SELECT generate_series(1, 25)")
        )
        assert isinstance(result.cursor, dbapi.ServerCursor)
        assert [row[0] for row in result] == list(range(1, 26))


def test_the_url_names_a_database_the_broker_does_not_serve(broker: BrokerProcess) -> None:
    engine = create_engine(f"postgresql+pgbroker://{broker.target}/nosuchdb", poolclass=NullPool)
    with pytest.raises(DBAPIError, match="serves database"):
        engine.connect()


def test_the_url_refuses_a_password_and_unknown_parameters(broker: BrokerProcess) -> None:
    with pytest.raises(ValueError, match="no password"):
        create_engine(f"postgresql+pgbroker://u:secret@{broker.target}/").connect()
    with pytest.raises((ValueError, ArgumentError), match="unknown query parameter 'sslmode'"):
        create_engine(f"postgresql+pgbroker://{broker.target}/?sslmode=require").connect()


def test_the_target_form_of_the_url(broker: BrokerProcess, postgres: Any) -> None:
    url = f"postgresql+pgbroker:///{postgres.database}?target=ipv4:{broker.target}&timeout=5"
    args = PGDialect_pgbroker().create_connect_args(create_engine(url).url)[1]
    assert args == {"target": f"ipv4:{broker.target}", "dbname": postgres.database, "timeout": 5.0}
    with create_engine(url, poolclass=NullPool).connect() as conn:
        assert conn.scalar(text("SELECT current_database()")) == postgres.database


def test_nothing_is_left_behind_in_postgres(engine: Engine, postgres: Any) -> None:
    """Every transaction above ended: no session of the broker is idle in transaction."""
    admin = connect(postgres)
    try:
        rows = admin.run(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND pid <> pg_backend_pid()"
        )
    finally:
        admin.close()
    assert rows[0][0] == 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+pgbroker://b.internal:6000/app",
            {"target": "b.internal:6000", "dbname": "app"},
        ),
        ("postgresql+pgbroker://b.internal", {"target": "b.internal:50051"}),
        ("postgresql+pgbroker://[::1]:7000", {"target": "[::1]:7000"}),
        ("postgresql+pgbroker://", {}),
        (
            "postgresql+pgbroker://h:1/?tls=true&tls_server_name=broker&max_attempts=3",
            {"target": "h:1", "tls": True, "tls_server_name": "broker", "max_attempts": 3},
        ),
    ],
)
def test_connect_args_from_the_url(url: str, expected: dict[str, Any]) -> None:
    assert connect_args_from_url(make_url(url)) == expected


def test_the_user_part_of_the_url_is_a_bearer_token() -> None:
    args = connect_args_from_url(make_url("postgresql+pgbroker://s3cret@h:1"))
    assert args["auth"]() == (("authorization", "Bearer s3cret"),)
    # One hook per token: the DB-API keeps one client (one channel) per target and options.
    assert (
        connect_args_from_url(make_url("postgresql+pgbroker://s3cret@h:1"))["auth"] is args["auth"]
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+pgbroker://h:1/?tls=maybe", "tls='maybe' must be true or false"),
        ("postgresql+pgbroker://h:1/?timeout=soon", "timeout='soon' is not a number"),
        ("postgresql+pgbroker://h:1/?target=dns:///x:1", "not both"),
        ("postgresql+pgbroker://h:1/?tls=1&tls=0", "tls is given more than once"),
    ],
)
def test_bad_urls_are_refused_by_name(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        connect_args_from_url(make_url(url))


def test_a_closed_dbapi_connection_is_a_disconnect_and_the_pool_replaces_it(
    broker: BrokerProcess,
) -> None:
    engine = create_engine(f"postgresql+pgbroker://{broker.target}/")  # QueuePool: reused
    with engine.connect() as conn:
        conn.connection.dbapi_connection.close()
        with pytest.raises(DBAPIError) as caught:
            conn.execute(text("SELECT 1"))
        assert caught.value.connection_invalidated
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT 1")) == 1
    engine.dispose()


def test_the_engine_recovers_when_the_broker_comes_back(start_broker_process: Any) -> None:
    process = start_broker_process()
    assert process.wait_serving(30)
    # The deadline is above the channel's reconnect backoff cap (2 s, with gRPC's ±20 %
    # jitter up to 2.4 s): a broker that comes back is found on the channel's next attempt,
    # which may be that far away.
    engine = create_engine(f"postgresql+pgbroker://{process.target}/?max_attempts=1&timeout=5")
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT 1")) == 1
    process.stop()
    with pytest.raises(OperationalError), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    process.start()
    assert process.wait_serving(30)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT 2")) == 2
    engine.dispose()


def test_the_timeout_option_applies_per_statement_and_the_default_comes_back(
    broker: BrokerProcess,
) -> None:
    engine = create_engine(f"postgresql+pgbroker://{broker.target}/", connect_args={"timeout": 7.0})
    with engine.connect() as conn:
        with pytest.raises(OperationalError):
            conn.execution_options(timeout=0.05).execute(text("SELECT pg_sleep(1)"))
        conn.rollback()
    with engine.connect() as conn:  # the same pooled DB-API connection, no option given
        conn.execute(text("SELECT 1"))
        assert conn.connection.dbapi_connection.timeout == 7.0
    engine.dispose()
