// Package deadletter keeps what the saga could not deliver, per order, in
// PostgreSQL: the records participants dead-lettered (byte-exact, so a
// re-drive sends the very record that failed) and the outbox records the
// broker refused for good (parked by the relay). The consumer loop records a
// dead letter in the transaction that dead-letters it; the api shows an
// order's dead letters and parked records in GET /orders/{id} and lets an
// admin re-drive one; `prozess dlq replay` marks what it replays. It also
// counts the paid orders the saga deadline leaves to an operator
// (PaidOverdue), for the expirer's metric, `prozess check` and the live page.
package deadletter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/event"
)

const (
	// HeaderReplayOf marks a record put back by a replay or a re-drive: the
	// participant that dead-lettered it applies it then (its inbox knew the
	// event only as dead). The value names the dead letter it came from.
	HeaderReplayOf = "prozess_replay_of"
	// HeaderID carries, on the dead-letter topic, the id of the dead
	// letter's row here, so a reader of the topic can re-drive it.
	HeaderID = "prozess_dlq_id"
	// TrailType is the audit-trail entry a re-drive leaves on its order.
	// It is not a saga event: it never travels on the topic.
	TrailType = "DeadLetterReplayed"
)

// Querier is the part of a pool or transaction this package reads with.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Record stores the record participant dead-letters for reason, inside the
// caller's transaction, and returns its id. The same record dead-lettered
// again by the same participant keeps its row.
func Record(ctx context.Context, tx Querier, participant, reason string, r *kgo.Record) (int64, error) {
	var order *uuid.UUID
	if id, err := uuid.ParseBytes(r.Key); err == nil {
		order = &id
	}
	typ := ""
	for _, h := range r.Headers {
		if h.Key == "ce_type" {
			typ = string(h.Value)
		}
	}
	var id int64
	// reason and type come from a record that may be poison: text columns
	// get them with NUL and invalid UTF-8 replaced (PostgreSQL refuses
	// both), the bytes stay exact in header_bytes.
	err := tx.QueryRow(ctx, `
		INSERT INTO dead_letters (order_id, participant, reason, event_type, topic, partition, "offset", key, value, header_bytes)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, coalesce($10, ''::bytea))
		ON CONFLICT (participant, topic, partition, "offset") DO UPDATE SET reason = EXCLUDED.reason
		RETURNING id`, order, participant, printable(reason), printable(typ), r.Topic, r.Partition, r.Offset, r.Key, r.Value,
		event.EncodeHeaders(r.Headers)).Scan(&id)
	if err != nil {
		return 0, fmt.Errorf("recording the dead letter of %s/%d@%d: %w", r.Topic, r.Partition, r.Offset, err)
	}
	return id, nil
}

// printable is s as PostgreSQL text takes it: valid UTF-8 without NUL.
func printable(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}

// Entry is one dead letter as an order's readers see it. Reason and
// ReplayedBy are for admins and operators; ForOwner leaves them out.
type Entry struct {
	ID          int64      `json:"id"`
	OrderID     *uuid.UUID `json:"order_id,omitempty"`
	Participant string     `json:"participant"`
	Code        string     `json:"code"` // Code(Reason)
	Reason      string     `json:"reason,omitempty"`
	Type        string     `json:"event_type"`
	At          time.Time  `json:"dead_lettered_at"`
	ReplayedAt  *time.Time `json:"replayed_at,omitempty"`
	ReplayedBy  string     `json:"replayed_by,omitempty"`
}

const entryColumns = `id, order_id, participant, reason, event_type, dead_at, replayed_at, coalesce(replayed_by, '')`

func scanEntries(rows pgx.Rows, err error) ([]Entry, error) {
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Entry, error) {
		var e Entry
		err := r.Scan(&e.ID, &e.OrderID, &e.Participant, &e.Reason, &e.Type, &e.At, &e.ReplayedAt, &e.ReplayedBy)
		e.Code = Code(e.Reason)
		return e, err
	})
}

// ForOrder lists an order's dead letters, oldest first, replayed ones too.
func ForOrder(ctx context.Context, db Querier, order uuid.UUID) ([]Entry, error) {
	es, err := scanEntries(db.Query(ctx, `SELECT `+entryColumns+` FROM dead_letters WHERE order_id = $1 ORDER BY id`, order))
	if err != nil {
		return nil, fmt.Errorf("reading dead letters of order %s: %w", order, err)
	}
	return es, nil
}

// Open lists the latest dead letters not replayed yet, newest first.
func Open(ctx context.Context, db Querier, limit int) ([]Entry, error) {
	es, err := scanEntries(db.Query(ctx, `SELECT `+entryColumns+` FROM dead_letters WHERE replayed_at IS NULL ORDER BY id DESC LIMIT $1`, limit))
	if err != nil {
		return nil, fmt.Errorf("reading open dead letters: %w", err)
	}
	return es, nil
}

// Parked is an outbox record of an order the broker refused for good.
type Parked struct {
	OutboxID int64     `json:"outbox_id"`
	Source   string    `json:"source"` // the participant that emitted it
	Type     string    `json:"event_type"`
	Reason   string    `json:"reason"`
	At       time.Time `json:"parked_at"`
}

// ParkedForOrder lists the parked records keyed by an order.
func ParkedForOrder(ctx context.Context, db Querier, order uuid.UUID) ([]Parked, error) {
	rows, err := db.Query(ctx, `SELECT id, headers, header_bytes, error, parked_at FROM parked WHERE key = $1 ORDER BY id`,
		[]byte(order.String()))
	if err != nil {
		return nil, fmt.Errorf("reading parked records of order %s: %w", order, err)
	}
	var out []Parked
	var p Parked
	var headers, headerBytes []byte
	_, err = pgx.ForEachRow(rows, []any{&p.OutboxID, &headers, &headerBytes, &p.Reason, &p.At}, func() error {
		hs, err := event.OutboxHeaders(headerBytes, headers)
		if err != nil {
			return fmt.Errorf("parked record %d: %w", p.OutboxID, err)
		}
		p.Source, p.Type = "", ""
		for _, h := range hs {
			switch h.Key {
			case "ce_type":
				p.Type = string(h.Value)
			case "ce_source":
				p.Source = event.SourceName(string(h.Value))
			}
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading parked records of order %s: %w", order, err)
	}
	return out, nil
}

// PaidOverdue counts the paid orders older than deadline that have not
// shipped: the saga deadline never cancels them (the money has moved), so
// they wait for an operator.
func PaidOverdue(ctx context.Context, db Querier, deadline time.Duration) (int64, error) {
	var n int64
	if err := db.QueryRow(ctx, `SELECT count(*) FROM orders WHERE status = 'PAID' AND created_at < now() - make_interval(secs => $1)`,
		deadline.Seconds()).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting paid orders past the saga deadline: %w", err)
	}
	return n, nil
}

// Errors of Redrive.
var (
	ErrNotFound = errors.New("no such dead letter")
	ErrReplayed = errors.New("dead letter already replayed")
)

// Age is how long ago a dead-lettered event happened: its ce_time, or, when
// that is missing or later, when it was dead-lettered (zero deadAt: not
// known). Participants that applied the event remember its id in their
// inboxes only for so long, so a replay's safety is judged by this age.
func Age(ceTime string, deadAt time.Time) time.Duration {
	at, err := time.Parse(time.RFC3339Nano, ceTime)
	if err != nil || !deadAt.IsZero() && deadAt.Before(at) {
		at = deadAt
	}
	if at.IsZero() {
		return 0 // no time at all: nothing says it is too old
	}
	return time.Since(at)
}

// TooOld is the refusal of a replay of an event age old, when the inboxes
// keep event ids for retention (topic's retention.ms plus
// --inbox-retention-margin; 0: for ever), or nil.
func TooOld(age, retention time.Duration, topic string) error {
	if retention <= 0 || age <= retention {
		return nil
	}
	return fmt.Errorf("%s old, older than the inboxes keep event ids (%s's retention.ms + --inbox-retention-margin = %s): "+
		"participants that applied it may have forgotten it and would apply it twice", age.Round(time.Second), topic, retention)
}

// RefusedError is a re-drive its guard refused, with the guard's reason.
type RefusedError struct {
	ID  int64 // the dead letter
	Err error
}

func (e *RefusedError) Error() string { return e.Err.Error() }

func (e *RefusedError) Unwrap() error { return e.Err }

// Redrive puts dead letter id back on its topic through the outbox, in one
// transaction that also marks it replayed by whom and records the re-drive
// in its order's audit trail; the relay publishes it, and the participant
// that dead-lettered it applies it (see HeaderReplayOf). guard, when set,
// may refuse a dead letter by its age (the inboxes forget event ids after
// a while, and a participant that applied it then would apply it again):
// it is given the event's Age.
func Redrive(ctx context.Context, pool *pgxpool.Pool, id int64, by string, guard func(age time.Duration) error) (Entry, error) {
	var e Entry
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var topic string
		var key, value, headerBytes []byte
		err := tx.QueryRow(ctx, `
			SELECT `+entryColumns+`, topic, key, value, header_bytes FROM dead_letters WHERE id = $1 FOR UPDATE`, id).
			Scan(&e.ID, &e.OrderID, &e.Participant, &e.Reason, &e.Type, &e.At, &e.ReplayedAt, &e.ReplayedBy, &topic, &key, &value, &headerBytes)
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return fmt.Errorf("reading dead letter %d: %w", id, err)
		}
		e.Code = Code(e.Reason)
		if e.ReplayedAt != nil {
			return ErrReplayed
		}
		return redrive(ctx, tx, &e, topic, key, value, headerBytes, by, 0, guard)
	})
	return e, err
}

// redrive writes dead letter e (locked, not replayed) back to the outbox
// with HeaderReplayOf and marks it replayed; redriveID is the bulk run's
// audit row, 0 for one re-driven by id.
func redrive(ctx context.Context, tx pgx.Tx, e *Entry, topic string, key, value, headerBytes []byte, by string, redriveID int64,
	guard func(age time.Duration) error) error {
	hs, err := event.DecodeHeaders(headerBytes)
	if err != nil {
		return fmt.Errorf("dead letter %d: %w", e.ID, err)
	}
	if err := ageOK(*e, hs, guard); err != nil {
		return err
	}
	hs = append(hs, kgo.RecordHeader{Key: HeaderReplayOf, Value: []byte("dead_letters:" + strconv.FormatInt(e.ID, 10))})
	if err := event.WriteOutbox(ctx, tx, &kgo.Record{Topic: topic, Key: key, Value: value, Headers: hs}); err != nil {
		return err
	}
	return markReplayed(ctx, tx, e, by, redriveID)
}

// MarkReplayed records that `prozess dlq replay` put dead letters ids back
// on the topic itself, as Redrive would have: replayed_at, replayed_by and
// the audit-trail entry. Ids already marked are left alone.
func MarkReplayed(ctx context.Context, pool *pgxpool.Pool, ids []int64, by string) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		es, err := scanEntries(tx.Query(ctx, `
			SELECT `+entryColumns+` FROM dead_letters WHERE id = ANY($1) AND replayed_at IS NULL ORDER BY id FOR UPDATE`, ids))
		if err != nil {
			return fmt.Errorf("reading dead letters %v: %w", ids, err)
		}
		for i := range es {
			if err := markReplayed(ctx, tx, &es[i], by, 0); err != nil {
				return err
			}
		}
		return nil
	})
}

func markReplayed(ctx context.Context, tx pgx.Tx, e *Entry, by string, redriveID int64) error {
	if err := tx.QueryRow(ctx, `UPDATE dead_letters SET replayed_at = now(), replayed_by = $2 WHERE id = $1 RETURNING replayed_at`,
		e.ID, by).Scan(&e.ReplayedAt); err != nil {
		return fmt.Errorf("marking dead letter %d replayed: %w", e.ID, err)
	}
	e.ReplayedBy = by
	if e.OrderID == nil {
		return nil
	}
	trail, err := uuid.NewV7()
	if err != nil {
		return fmt.Errorf("new trail entry id: %w", err)
	}
	trailed := map[string]any{"dead_letter_id": e.ID, "participant": e.Participant, "event_type": e.Type,
		"reason": e.Reason, "replayed_by": by}
	if redriveID > 0 {
		trailed["redrive_id"] = redriveID // the bulk run's row in redrives
	}
	payload, err := json.Marshal(trailed)
	if err != nil {
		return fmt.Errorf("encoding trail entry: %w", err)
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload) VALUES ($1, $2, $3, $4, now(), $5)`,
		trail, *e.OrderID, TrailType, by, payload); err != nil {
		return fmt.Errorf("recording the re-drive of dead letter %d in the audit trail: %w", e.ID, err)
	}
	return nil
}
