-- +goose Up
-- Outbox rows the broker refused for good (too large, topic gone, not
-- authorized): the relay moves each here with the broker's error, so one
-- record can never stop the outbox behind it. Shown by `prozess dlq list`
-- and the prozess_relay_parked_records metric.
CREATE TABLE parked (
    id         bigint PRIMARY KEY,   -- its outbox id
    topic      text NOT NULL,
    key        bytea,
    value      bytea,
    headers    jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    error      text NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE parked;
