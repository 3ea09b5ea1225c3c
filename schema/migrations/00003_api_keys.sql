-- +goose Up
-- API keys: only a SHA-256 of each key is stored (keys are 256-bit random,
-- so a fast hash is enough, as GitHub and Stripe do); the id is the key's
-- public part, safe to list and log.
CREATE TABLE api_keys (
    id         text PRIMARY KEY,
    user_id    text NOT NULL,
    admin      boolean NOT NULL DEFAULT false,
    hash       bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- +goose Down
DROP TABLE api_keys;
