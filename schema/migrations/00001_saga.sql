-- +goose Up

-- The catalogue. Inventory is the only writer of stock; the guard
-- CHECK (stock >= 0) backs up the guarded UPDATEs.
CREATE TABLE products (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    price_cents bigint NOT NULL CHECK (price_cents >= 0),
    stock       bigint NOT NULL CHECK (stock >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Orders are inserted by the api (status CREATED) in the same transaction as
-- their items and their OrderCreated event; afterwards the status participant
-- is the only writer of status.
CREATE TABLE orders (
    id              uuid PRIMARY KEY,
    user_id         text NOT NULL,
    status          text NOT NULL CHECK (status IN ('CREATED', 'INVENTORY_RESERVED', 'PAID', 'SHIPPED', 'CANCELLED')),
    amount_cents    bigint NOT NULL CHECK (amount_cents >= 0),
    idempotency_key text,
    request_hash    bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The source of truth for idempotent POSTs; Redis only caches it.
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX orders_status_idx ON orders (status) WHERE status NOT IN ('SHIPPED', 'CANCELLED');

CREATE TABLE order_items (
    order_id    uuid NOT NULL REFERENCES orders (id),
    product_id  text NOT NULL,
    qty         int NOT NULL CHECK (qty > 0),
    price_cents bigint NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

-- Transactional outbox: events (and dead letters) waiting for the relay.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    key        bytea,
    value      bytea,
    headers    jsonb NOT NULL DEFAULT '[]',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Wakes the relay at commit; a slow poll covers a missed notification.
-- +goose StatementBegin
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('prozess_outbox', '');
    RETURN NULL;
END $$;
-- +goose StatementEnd
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Inbox: one row per (consumer, event) processed, written in the same
-- transaction as the effect, so a redelivered event has no second effect.
CREATE TABLE inbox (
    consumer     text NOT NULL,
    event_id     uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Inventory: what each order holds, so a release gives back exactly that, once.
CREATE TABLE reservations (
    order_id    uuid NOT NULL,
    product_id  text NOT NULL,
    qty         int NOT NULL CHECK (qty > 0),
    reserved_at timestamptz NOT NULL DEFAULT now(),
    released_at timestamptz,
    PRIMARY KEY (order_id, product_id)
);

-- Payment: one stored decision per order; never a second charge.
CREATE TABLE payments (
    order_id     uuid PRIMARY KEY,
    id           uuid NOT NULL UNIQUE,
    amount_cents bigint NOT NULL,
    status       text NOT NULL CHECK (status IN ('COMPLETED', 'DECLINED')),
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Delivery: one shipment per order.
CREATE TABLE shipments (
    order_id   uuid PRIMARY KEY,
    id         uuid NOT NULL UNIQUE,
    carrier    text NOT NULL,
    tracking   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Status: the audit log, in the order the status participant consumed it,
-- which is the topic's order for one order id.
CREATE TABLE order_events (
    seq         bigserial PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    order_id    uuid NOT NULL,
    type        text NOT NULL,
    source      text NOT NULL,
    occurred_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    payload     jsonb NOT NULL
);
CREATE INDEX order_events_order_idx ON order_events (order_id, seq);

-- +goose Down
DROP TABLE order_events, shipments, payments, reservations, inbox, outbox, order_items, orders, products;
DROP FUNCTION outbox_notify();
