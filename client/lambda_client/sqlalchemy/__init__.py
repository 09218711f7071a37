"""The SQLAlchemy dialect ``postgresql+pgbroker``: SQLAlchemy's PostgreSQL dialect over
`lambda_client.dbapi`, so existing SQLAlchemy code (and Alembic) switches by changing a URL.

::

    engine = create_engine("postgresql+pgbroker://broker.internal:50051/app?tls=true",
                           poolclass=NullPool)

    def handler(event, context):
        with Session(engine.execution_options(lambda_context=context)) as session:
            ...

Registered through the ``sqlalchemy.dialects`` entry point of the client distribution
(``pip install "pgbroker-client[sqlalchemy]"``). docs/sqlalchemy.md has the URL forms, the
engine options for Lambda and what differs from a direct Postgres connection.
"""

from lambda_client.sqlalchemy.dialect import PGDialect_pgbroker

__all__ = ["PGDialect_pgbroker", "dialect"]

dialect = PGDialect_pgbroker
