-- +goose Up
-- No NOTIFY at commit. A transaction that notified takes a cluster-wide lock
-- at commit and holds it through its WAL flush (PreCommit_Notify), so every
-- api and consumer commit queued behind every other one, undoing group
-- commit: measured at 1200 orders/s, end-to-end p99 100-240 ms with the
-- trigger, 70-93 ms without (docs/PERFORMANCE.md). The relay is woken in
-- process instead (saga.OutboxSignal), and a process whose relay is not the
-- leader sends one NOTIFY after its commits, outside them.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();

-- +goose Down
-- +goose StatementBegin
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('prozess_outbox', '');
    RETURN NULL;
END $$;
-- +goose StatementEnd
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
