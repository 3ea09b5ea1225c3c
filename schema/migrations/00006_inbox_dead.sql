-- +goose Up
-- An inbox row for a record its participant dead-lettered: the id is known
-- (a redelivery is skipped, not dead-lettered twice), but the effect was
-- never applied, so a deliberate replay (`prozess dlq replay`) re-drives it
-- to this participant, once.
ALTER TABLE inbox ADD COLUMN dead boolean NOT NULL DEFAULT false;

-- +goose Down
ALTER TABLE inbox DROP COLUMN dead;
