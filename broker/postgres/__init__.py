"""The Postgres side: ``pg`` is the one module in the broker that imports pg8000 (connect,
protocol, decoding, cancel, error class); beside it parameter binding, credentials, the
connection budget and the session audit. Imports nothing from front, flow or pooling."""
