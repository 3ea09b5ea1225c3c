package deadletter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/modules/event"
)

// ErrParkedNotFound: no parked record has that id (never parked, or sent
// again already).
var ErrParkedNotFound = errors.New("no such parked record")

// Unparked is a parked record put back into the outbox.
type Unparked struct {
	ParkedID int64      `json:"parked_id"` // its outbox id when it was parked
	OutboxID int64      `json:"outbox_id"` // its outbox id now
	OrderID  *uuid.UUID `json:"order_id,omitempty"`
	Topic    string     `json:"topic"`
	Type     string     `json:"event_type"`
	Reason   string     `json:"reason"` // the broker's error that parked it
	ParkedAt time.Time  `json:"parked_at"`
	By       string     `json:"replayed_by"`
}

// Unpark puts parked record id back into the outbox, once the cause that
// parked it is fixed: in one transaction it moves the row (its bytes as
// they were; a new outbox id, so the relay sends it after what is waiting
// already), notifies the relay, and, when its key is an order, leaves a
// TrailType entry on that order's audit trail naming who did it, as a
// dead letter's re-drive does. A record the broker still refuses for good
// is parked again, under its new id.
func Unpark(ctx context.Context, pool *pgxpool.Pool, id int64, by string) (Unparked, error) {
	var u Unparked
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) (err error) {
		if u, err = unpark(ctx, tx, id, by, 0); err != nil {
			return err
		}
		return wakeRelay(ctx, tx)
	})
	return u, err
}

// unpark moves parked record id back into the outbox inside tx and writes
// its trail entry; redriveID is the bulk run's audit row, 0 for one sent
// again by id.
func unpark(ctx context.Context, tx pgx.Tx, id int64, by string, redriveID int64) (Unparked, error) {
	u := Unparked{ParkedID: id, By: by}
	var key, headers, headerBytes []byte
	err := tx.QueryRow(ctx, `
		WITH p AS (DELETE FROM parked WHERE id = $1 RETURNING topic, key, value, headers, header_bytes, error, parked_at),
		o AS (INSERT INTO outbox (topic, key, value, headers, header_bytes)
			SELECT topic, key, value, headers, header_bytes FROM p RETURNING id)
		SELECT o.id, p.topic, p.key, p.headers, p.header_bytes, p.error, p.parked_at FROM o, p`, id).
		Scan(&u.OutboxID, &u.Topic, &key, &headers, &headerBytes, &u.Reason, &u.ParkedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return u, ErrParkedNotFound
	}
	if err != nil {
		return u, fmt.Errorf("moving parked record %d back into the outbox: %w", id, err)
	}
	if hs, err := event.OutboxHeaders(headerBytes, headers); err == nil {
		for _, h := range hs {
			if h.Key == "ce_type" {
				u.Type = string(h.Value)
			}
		}
	}
	order, err := uuid.ParseBytes(key)
	if err != nil {
		return u, nil // not an order's record (a dead letter's copy, say): no trail to write
	}
	var known bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)`, order).Scan(&known); err != nil {
		return u, fmt.Errorf("reading order %s: %w", order, err)
	}
	if !known {
		return u, nil
	}
	u.OrderID = &order
	trail, err := uuid.NewV7()
	if err != nil {
		return u, fmt.Errorf("new trail entry id: %w", err)
	}
	trailed := map[string]any{"parked_id": id, "outbox_id": u.OutboxID, "event_type": u.Type, "reason": u.Reason, "replayed_by": by}
	if redriveID > 0 {
		trailed["redrive_id"] = redriveID
	}
	payload, err := json.Marshal(trailed)
	if err != nil {
		return u, fmt.Errorf("encoding trail entry: %w", err)
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload) VALUES ($1, $2, $3, $4, now(), $5)`,
		trail, order, TrailType, by, payload); err != nil {
		return u, fmt.Errorf("recording the replay of parked record %d in the audit trail: %w", id, err)
	}
	return u, nil
}

// ParkedIDs lists the parked records' ids, oldest first.
func ParkedIDs(ctx context.Context, db Querier) ([]int64, error) {
	rows, err := db.Query(ctx, `SELECT id FROM parked ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("listing parked records: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("listing parked records: %w", err)
	}
	return ids, nil
}
