"""Security: caller identities, token and IAM authentication, the gate that wraps handlers,
role mapping, per-caller limits and TLS. Imports nothing from the front, flow or pooling.

* `identity` — `Identity`, `current_identity`, the `AuthError` tree, `AuthStats`, `NoAuth`;
  imports only `broker.errors`; every module below builds on it.
* `tokens` — bearer tokens (``PGBROKER_AUTH=token``); `iam` — signed GetCallerIdentity
  (``PGBROKER_AUTH=iam``).
* `gate` — `AuthGate`: wraps a service's handlers so each call is authenticated first.
* `auth` — the authenticator for the configured mode.
* `roles` — ``PGBROKER_ROLE_MAP``; `limits` — per-request and per-caller limits; `tls` — the
  server's TLS credentials.
"""
