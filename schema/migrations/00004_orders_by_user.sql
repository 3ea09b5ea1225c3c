-- +goose Up
-- A user's latest orders (the live page's first snapshot): order ids are
-- UUIDv7, so id order is creation order and (user_id, id) serves
-- "WHERE user_id = $1 ORDER BY id DESC LIMIT n" without a sort.
CREATE INDEX orders_user_latest_idx ON orders (user_id, id);

-- +goose Down
DROP INDEX orders_user_latest_idx;
