"""SQL analysis with Postgres' own parser (pglast): session-state classification and the
checks a request's SQL gets before it queues. Imports nothing else from the broker."""
