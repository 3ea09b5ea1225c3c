-- +goose Up
-- Record headers byte-exact: jsonb cannot hold a NUL byte and turns bytes
-- that are not UTF-8 into U+FFFD, so a poison record's headers could make
-- even its dead-lettering fail, and a replay would send an altered record.
-- New rows carry header_bytes (event.EncodeHeaders); rows written before
-- keep their JSON headers, which the relay still reads.
ALTER TABLE outbox ADD COLUMN header_bytes bytea;
ALTER TABLE parked ADD COLUMN header_bytes bytea;

-- +goose Down
ALTER TABLE parked DROP COLUMN header_bytes;
ALTER TABLE outbox DROP COLUMN header_bytes;
