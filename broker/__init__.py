"""pgbroker's broker: a gRPC service holding a fixed Postgres pool (``python -m broker``).

Subpackages by concern; imports go one way, down this list (checked by ``make lint``)::

    broker.front      the gRPC front: server, service handlers, status mapping, workers, metrics
    broker.flow       the transaction flow: a batch (or a held connection) on one pooled connection
    broker.pooling    the fixed pool: FIFO waiters, timeouts, reconnects, stats (no gRPC)
    broker.postgres   the Postgres side: the one module that imports pg8000, parameters,
                      credentials, the connection budget, the session audit
    broker.config     the settings table (every PGBROKER_* variable), the one environment reader;
                      it checks values with their owners' parsers (roles, tokens, IAM)
    broker.security   identity, tokens, IAM, the gate that wraps handlers, roles, limits, TLS
    broker.sql        SQL analysis with Postgres' own parser: one plan per request
    broker.configvalues  parsers of setting values: durations, byte sizes, host:port, the URL
    broker.errors     the error base every failure derives from (code, reason, retry-after)

The architecture and the request's way through these parts are in the README's "Architecture"
section and in docs/broker.md.
"""
