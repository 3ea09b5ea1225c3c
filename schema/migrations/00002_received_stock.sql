-- +goose Up
-- received is every unit a product ever had: stock only moves between stock
-- and reservations, so received = stock + reservations not released is the
-- stock conservation invariant `prozess check` verifies.
ALTER TABLE products ADD COLUMN received bigint NOT NULL DEFAULT 0;
UPDATE products p SET received = p.stock + coalesce(
    (SELECT sum(r.qty) FROM reservations r WHERE r.product_id = p.id AND r.released_at IS NULL), 0);

-- +goose Down
ALTER TABLE products DROP COLUMN received;
