"""pgbroker: a gRPC broker holding a fixed Postgres pool (see DESIGN.md)."""
