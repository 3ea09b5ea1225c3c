-- +goose Up
-- Cancellation (issue 23). Additive only, so the previous release keeps
-- serving beside this one: it never reads these columns or tables.
--
-- cancel_requested_at/by: stamped by the api, in the transaction that
-- emits OrderCancelRequested, once per order. Delivery reads the stamp
-- under a row lock before it ships (the api takes the row FOR UPDATE and
-- refuses with 409 once a shipment exists), so a cancel and a shipment
-- exclude each other whichever commits first. Nullable without a
-- default: adding them rewrites nothing.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS cancel_requested_at timestamptz;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS cancel_requested_by text;

-- Delivery: the paid orders it did not ship because their cancel came
-- first (ShipmentCancelled), one row per order, so a redelivered
-- PaymentCompleted finds the decision and never ships or withholds twice.
CREATE TABLE IF NOT EXISTS withheld_shipments (
    order_id    uuid PRIMARY KEY,
    withheld_at timestamptz NOT NULL DEFAULT now()
);

-- Payment: one refund per order, of its completed payment, recorded like a
-- charge (ON CONFLICT on the order), so a redelivered ShipmentCancelled
-- never refunds twice.
CREATE TABLE IF NOT EXISTS refunds (
    order_id     uuid PRIMARY KEY,
    id           uuid NOT NULL UNIQUE,
    payment_id   uuid NOT NULL UNIQUE,
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE IF EXISTS refunds, withheld_shipments;
ALTER TABLE orders DROP COLUMN IF EXISTS cancel_requested_by;
ALTER TABLE orders DROP COLUMN IF EXISTS cancel_requested_at;
