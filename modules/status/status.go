// Package status is the saga participant that records what happened: every
// event goes to the audit log, moves orders.status forward along the
// lifecycle (it is the only writer of status after creation), and, once its
// transaction has committed, advances the Redis status cache.
package status

import (
	"context"
	"fmt"
	"log/slog"

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

// Handle records one event and moves its order's status forward.
func (s *Status) Handle(ctx context.Context, tx pgx.Tx, ev event.Event) ([]event.Event, error) {
	if _, err := tx.Exec(ctx, `
		INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload)
		VALUES ($1, $2, $3, $4, $5, $6)
		ON CONFLICT (event_id) DO NOTHING`,
		ev.ID, ev.OrderID, string(ev.Type), ev.Source, ev.Time, string(ev.Data)); err != nil {
		return nil, fmt.Errorf("recording %s for order %s: %w", ev.Type, ev.OrderID, err)
	}
	next, ok := event.StatusAfter(ev.Type)
	if !ok {
		return nil, nil
	}
	// The rank guard makes status forward-only: a duplicate or late event
	// matches no row.
	if _, err := tx.Exec(ctx, `
		UPDATE orders SET status = $2, updated_at = now()
		WHERE id = $1 AND `+rankSQL+` < $3`,
		ev.OrderID, string(next), next.Rank()); err != nil {
		return nil, fmt.Errorf("moving order %s to %s: %w", ev.OrderID, next, err)
	}
	return nil, nil
}

// rankSQL is event.Status.Rank in SQL.
const rankSQL = `(CASE status WHEN 'CREATED' THEN 0 WHEN 'INVENTORY_RESERVED' THEN 1 WHEN 'PAID' THEN 2 ELSE 3 END)`

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
	if err := s.cache.Advance(ctx, us); err != nil {
		s.log.Warn("status cache not updated", "orders", len(us), "err", err)
	}
}
