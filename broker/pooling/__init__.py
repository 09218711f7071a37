"""Pooling: the fixed pool of server connections, FIFO waiters, queue timeout, reconnects and
statistics. Imports broker.postgres and broker.errors only; never gRPC."""
