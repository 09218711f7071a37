"""SQL analysis with Postgres' own parser (pglast): a request's plan (`plan`: its SQL parsed
once, cached by text) and the session-state classification it applies (`sessionstate`).
Imports nothing else from the broker."""
