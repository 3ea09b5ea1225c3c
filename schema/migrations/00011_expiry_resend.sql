-- +goose NO TRANSACTION
-- +goose Up
-- An OrderExpired that went nowhere (dead-lettered, skipped by a payment
-- older than the event, parked) used to leave its order stuck forever: the
-- sweeper now sends it again, with the same event id, until the order ends,
-- backing off between sends (issue 21). expiry_event_id is that id, so a
-- participant that applied the expiry skips the copy; expiry_sends and
-- expiry_sent_at pace the copies. Added columns with constant defaults
-- rewrite nothing, and the index is built without blocking writes: the
-- migration runs while the previous release is serving.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS expiry_event_id uuid;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS expiry_sends int NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS expiry_sent_at timestamptz;
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_expired_unfinished_idx ON orders (expired_at)
    WHERE status IN ('CREATED', 'INVENTORY_RESERVED') AND expired_at IS NOT NULL;

-- +goose Down
DROP INDEX IF EXISTS orders_expired_unfinished_idx;
ALTER TABLE orders DROP COLUMN IF EXISTS expiry_sent_at;
ALTER TABLE orders DROP COLUMN IF EXISTS expiry_sends;
ALTER TABLE orders DROP COLUMN IF EXISTS expiry_event_id;
