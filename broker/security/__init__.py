"""Security: caller identities, token and IAM authentication, the gate that wraps handlers,
role mapping, per-caller limits and TLS. Imports nothing from the front, flow or pooling."""
