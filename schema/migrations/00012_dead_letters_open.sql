-- +goose NO TRANSACTION
-- +goose Up
-- The open dead letters (not replayed yet), for the prozess_dead_letters_open
-- gauge every process reads every few seconds: counted through this partial
-- index, the count costs what waits for an operator, not every dead letter
-- ever recorded. Built without blocking writes: the migration runs while the
-- previous release is serving.
CREATE INDEX CONCURRENTLY IF NOT EXISTS dead_letters_open_idx ON dead_letters (dead_at)
    WHERE replayed_at IS NULL;

-- +goose Down
DROP INDEX IF EXISTS dead_letters_open_idx;
