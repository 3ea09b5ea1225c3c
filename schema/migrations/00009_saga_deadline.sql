-- +goose Up
-- Every saga ends: the status participant's sweeper stamps expired_at on an
-- order that has not reached payment by --saga-deadline, in the same
-- transaction as the OrderExpired it emits, so each order expires once.
ALTER TABLE orders ADD COLUMN expired_at timestamptz;
CREATE INDEX orders_unfinished_idx ON orders (created_at)
    WHERE status IN ('CREATED', 'INVENTORY_RESERVED') AND expired_at IS NULL;

-- Inventory's memory of the orders whose payment failed (declined or
-- expired): a reservation that arrives after the release (a late or
-- replayed OrderCreated) finds its order here and fails instead of holding
-- stock nobody will give back.
CREATE TABLE cancelled_orders (
    order_id     uuid PRIMARY KEY,
    cancelled_at timestamptz NOT NULL DEFAULT now()
);

-- Every record a participant dead-lettered, byte-exact, written in the
-- transaction that dead-letters it: GET /orders/{id}, `prozess orders get`
-- and the live page show an order's dead letters from here, and an admin
-- re-drives one through the outbox (replayed_at, replayed_by; the order's
-- audit trail gets a DeadLetterReplayed entry). The dead-letter topic keeps
-- the same records for `prozess dlq` and other consumers.
CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    order_id     uuid,              -- the record's key, when it is an order id
    participant  text NOT NULL,
    reason       text NOT NULL,
    event_type   text NOT NULL,     -- ce_type, '' when it had none
    topic        text NOT NULL,
    partition    int NOT NULL,
    "offset"     bigint NOT NULL,
    key          bytea,
    value        bytea,
    header_bytes bytea NOT NULL,    -- the original headers (event.EncodeHeaders)
    dead_at      timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    replayed_by  text,
    UNIQUE (participant, topic, partition, "offset")
);
CREATE INDEX dead_letters_order_idx ON dead_letters (order_id);

-- +goose Down
DROP TABLE dead_letters, cancelled_orders;
DROP INDEX orders_unfinished_idx;
ALTER TABLE orders DROP COLUMN expired_at;
