"""The transaction flow: runs a batch on one pooled connection (BEGIN … COMMIT, retries before
anything ran, cancel on deadline). Imports pooling, postgres, sql and security; never gRPC."""
