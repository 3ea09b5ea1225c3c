package status

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/retry"
)

// Expirer ends the sagas that stopped short of payment: every order older
// than the deadline still CREATED or INVENTORY_RESERVED (a dead-lettered
// record, a participant down for good) gets an OrderExpired, once. Payment
// answers it with a PaymentFailed unless it has decided already, and
// inventory gives back what the order holds; so an expired order is
// cancelled by the compensation every declined order takes, and a paid one
// is left alone. Paid orders past the deadline that have not shipped are
// counted for the operator (Sweep's second result), never cancelled: the
// money has moved.
//
// It runs beside the status participant, which owns orders.status. Several
// status processes may sweep at once: FOR UPDATE SKIP LOCKED and the
// expired_at stamp, written in the transaction that emits the event, make
// each order expire exactly once.
type Expirer struct {
	log       *slog.Logger
	pool      *pgxpool.Pool
	topic     string
	deadline  time.Duration
	batch     int
	committed func() // after a sweep's OrderExpired events commit; may be nil
}

// NewExpirer returns the sweeper for orders older than deadline; their
// OrderExpired goes to topic through the outbox, and committed (when set)
// is called after each sweep that wrote some, to wake the relay.
func NewExpirer(log *slog.Logger, pool *pgxpool.Pool, topic string, deadline time.Duration, committed func()) *Expirer {
	return &Expirer{log: log, pool: pool, topic: topic, deadline: deadline, batch: 500, committed: committed}
}

// Sweep expires up to one batch of overdue orders and counts the paid ones
// past the deadline.
func (x *Expirer) Sweep(ctx context.Context) (expired int, paidOverdue int64, err error) {
	err = pgx.BeginFunc(ctx, x.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `
			SELECT id FROM orders
			WHERE status IN ('CREATED', 'INVENTORY_RESERVED') AND expired_at IS NULL
			  AND created_at < now() - make_interval(secs => $1)
			ORDER BY created_at LIMIT $2
			FOR UPDATE SKIP LOCKED`, x.deadline.Seconds(), x.batch)
		if err != nil {
			return fmt.Errorf("finding overdue orders: %w", err)
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return fmt.Errorf("finding overdue orders: %w", err)
		}
		if len(ids) == 0 {
			return nil
		}
		if _, err := tx.Exec(ctx, `UPDATE orders SET expired_at = now() WHERE id = ANY($1)`, ids); err != nil {
			return fmt.Errorf("stamping %d expired orders: %w", len(ids), err)
		}
		evs := make([]event.Event, len(ids))
		for i, id := range ids {
			if evs[i], err = event.New(event.OrderExpired, id, Name, event.Expired{Deadline: x.deadline.String()}); err != nil {
				return err
			}
		}
		expired = len(ids)
		return event.Emit(ctx, tx, x.topic, evs...)
	})
	if err != nil {
		return 0, 0, err
	}
	if expired > 0 && x.committed != nil {
		x.committed()
	}
	if paidOverdue, err = deadletter.PaidOverdue(ctx, x.pool, x.deadline); err != nil {
		return expired, 0, err
	}
	return expired, paidOverdue, nil
}

// Run sweeps every interval until ctx ends (sooner while a sweep finds a
// full batch), calling report with each sweep's figures. A failed sweep is
// retried with backoff: an outage delays expiry, it loses none.
func (x *Expirer) Run(ctx context.Context, interval time.Duration, report func(expired int, paidOverdue int64)) error {
	failures := 0
	for {
		expired, overdue, err := x.Sweep(ctx)
		wait := interval
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			x.log.Warn("expiring overdue orders failed", "attempt", failures+1, "err", err)
			if retry.Wait(ctx, failures) != nil {
				return nil
			}
			failures++
			continue
		case expired == x.batch:
			wait = 0 // more are waiting
		}
		failures = 0
		if expired > 0 {
			x.log.Info("orders expired: the saga deadline passed before payment", "orders", expired, "deadline", x.deadline)
		}
		if report != nil {
			report(expired, overdue)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}
