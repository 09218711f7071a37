"""`make bench`: pgbroker side by side with PgBouncer and direct connections.

One run, one machine, one Postgres (pgbench's schema), the same pool size (20) and the same
workloads for every competitor, reported as ratios:

* direct — one pg8000 connection per simulated Lambda container;
* pgbouncer+asyncpg — PgBouncer (``pool_mode=transaction``) driven by asyncpg;
* pgbouncer+pgbench — the same PgBouncer driven by pgbench (a C client, reference line);
* pgbroker — the broker driven through `lambda_client`, one channel per container;
* pgbouncer+psycopg — W4 only: Django's stock postgresql backend (psycopg) through PgBouncer.

Workloads: W1 point select, W2 TPC-B-like transfer (think time 1 ms and 0), W3 burst of
fresh invocations, W4 a Django view of 10 ORM queries (lambda_client.django through pgbroker
against the stock backend through PgBouncer; `bench.django_view`), W1/W2 with 0.5 ms one-way
delay on the client <-> pooler hop, and cold start. See ``docs/performance.md`` for the latest
figures.
"""
