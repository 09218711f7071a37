-- Tables the example handler (examples/handler.py) uses. Safe to run more than once.
CREATE TABLE IF NOT EXISTS accounts (
    id      bigint PRIMARY KEY,
    balance numeric(12, 2) NOT NULL CHECK (balance >= 0)
);

CREATE TABLE IF NOT EXISTS transfers (
    id          bigserial PRIMARY KEY,
    request_id  text NOT NULL,
    from_id     bigint NOT NULL REFERENCES accounts (id),
    to_id       bigint NOT NULL REFERENCES accounts (id),
    amount      numeric(12, 2) NOT NULL CHECK (amount > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO accounts (id, balance)
SELECT id, 1000000 FROM generate_series(1, 100) AS id
ON CONFLICT (id) DO NOTHING;
