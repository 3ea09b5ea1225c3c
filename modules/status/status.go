// Package status is the saga participant that records what happened: every
// event goes to the audit log, moves orders.status forward along the
// lifecycle (it is the only writer of status after creation), and, once its
// transaction has committed, advances the Redis status cache.
package status

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/google/uuid"

	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
)

// Name is the participant's name, its event source and consumer group suffix.
const Name = "status"

// Status handles every event.
type Status struct {
	log   *slog.Logger
	cache *statuscache.Cache
}

// New returns the status participant.
func New(log *slog.Logger, cache *statuscache.Cache) *Status { return &Status{log: log, cache: cache} }

// Handles reports true for every type, unknown ones included: the audit log
// must see everything, and a record it cannot read is dead-lettered.
func (*Status) Handles(event.Type) bool { return true }

// Handle records a batch in two statements: every event into the audit log,
// then each order's status moved to the furthest status its events reach.
func (s *Status) Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	n := len(evs)
	ids, orders := make([]uuid.UUID, n), make([]uuid.UUID, n)
	types, sources, payloads := make([]string, n), make([]string, n), make([]string, n)
	times := make([]time.Time, n)
	next := map[uuid.UUID]event.Status{}
	var order []uuid.UUID // first appearance, for a stable statement
	for i, ev := range evs {
		ids[i], orders[i], types[i], sources[i], times[i], payloads[i] = ev.ID, ev.OrderID, string(ev.Type), ev.Source, ev.Time, string(ev.Data)
		st, ok := event.StatusAfter(ev.Type)
		if !ok {
			continue
		}
		cur, seen := next[ev.OrderID]
		if !seen {
			order = append(order, ev.OrderID)
		}
		if !seen || st.Rank() > cur.Rank() {
			next[ev.OrderID] = st
		}
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload)
		SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[])
		ON CONFLICT (event_id) DO NOTHING`, ids, orders, types, sources, times, payloads); err != nil {
		return nil, fmt.Errorf("recording %d events: %w", n, err)
	}
	if len(order) == 0 {
		return nil, nil
	}
	statuses, ranks := make([]string, len(order)), make([]int32, len(order))
	for i, id := range order {
		statuses[i], ranks[i] = string(next[id]), int32(next[id].Rank())
	}
	// The rank guard makes status forward-only: a duplicate or late event
	// matches no row.
	if _, err := tx.Exec(ctx, `
		UPDATE orders SET status = v.status, updated_at = now()
		FROM unnest($1::uuid[], $2::text[], $3::int[]) AS v(id, status, rank)
		WHERE orders.id = v.id AND `+rankSQL+` < v.rank`, order, statuses, ranks); err != nil {
		return nil, fmt.Errorf("moving %d orders forward: %w", len(order), err)
	}
	return nil, nil
}

// rankSQL is event.Status.Rank in SQL.
const rankSQL = `(CASE orders.status WHEN 'CREATED' THEN 0 WHEN 'INVENTORY_RESERVED' THEN 1 WHEN 'PAID' THEN 2 ELSE 3 END)`

// AfterCommit advances the status cache for a committed batch. The cache is a
// fast path only: a failure is logged, and the entry's short lifetime and
// forward-only writes let it heal.
func (s *Status) AfterCommit(ctx context.Context, evs []event.Event) {
	us := make([]statuscache.Update, 0, len(evs))
	for _, ev := range evs {
		if next, ok := event.StatusAfter(ev.Type); ok {
			us = append(us, statuscache.Update{OrderID: ev.OrderID, Status: next})
		}
	}
	// Bounded: a Redis outage must not hold up the saga.
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := s.cache.Advance(ctx, us); err != nil {
		s.log.Warn("status cache not updated", "orders", len(us), "err", err)
	}
}
