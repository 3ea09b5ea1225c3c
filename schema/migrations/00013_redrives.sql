-- +goose Up
-- Who re-drove what, for bulk re-drives (POST /admin/dead-letters/replay,
-- POST /admin/parked/replay, `prozess dlq replay` and `dlq unpark` with a
-- filter or ids): one row per run that changed something, with the filter
-- as it was given and the ids it re-drove. Each dead letter also keeps
-- replayed_at/replayed_by, and each order's audit trail a
-- DeadLetterReplayed entry naming this row; parked rows are gone once sent
-- again, so this row is what is left of them. A new table only: nothing
-- the previous release reads changes.
CREATE TABLE IF NOT EXISTS redrives (
    id      bigserial PRIMARY KEY,
    kind    text NOT NULL CHECK (kind IN ('dead_letters', 'parked')),
    done_by text NOT NULL,
    done_at timestamptz NOT NULL DEFAULT now(),
    filter  jsonb NOT NULL,
    ids     bigint[] NOT NULL,
    count   int NOT NULL
);

-- +goose Down
DROP TABLE IF EXISTS redrives;
