-- +goose Up
-- This database's identity. Redis keys carry it, so a cache shared by two
-- deployments (or a database restored from an older backup: a new
-- deployment id is not implied then, but its idempotency hits are still
-- confirmed in PostgreSQL) never answers for another database.
CREATE TABLE deployment (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO deployment DEFAULT VALUES;

-- +goose Down
DROP TABLE deployment;
