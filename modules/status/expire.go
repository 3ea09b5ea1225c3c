package status

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/retry"
)

// Expirer ends the sagas that stopped short of payment: an order still
// CREATED or INVENTORY_RESERVED whose next step a participant has held for
// longer than the deadline gets an OrderExpired. Payment answers it with a
// PaymentFailed unless it has decided already, and inventory gives back
// what the order holds; so an expired order is cancelled by the
// compensation every declined order takes, and a paid one is left alone.
// Paid orders past the deadline that have not shipped are counted for the
// operator (Sweep's second result), never cancelled: the money has moved.
//
// The deadline judges the participants, not the backlog (docs/FAULTS.md,
// "The saga deadline and backlogs"). An order's clock starts when the
// participant that owes its next step received the event it must answer
// (its inbox row: inventory for OrderCreated, payment for
// InventoryReserved), or when a record of the order was dead-lettered by
// that participant or parked by the relay. An order whose event has not
// reached that participant yet, because it is down or behind, waits however
// long the backlog lasts: expiring it would cancel an order for the
// system's own delay, and its compensation would queue behind the same
// backlog. While the outbox is behind (its oldest row older than grace) no
// order expires at all, nor for grace after it caught up: the answer that
// moves an order on may be waiting there, or on its way to status.
//
// An expiry is sent again, with the same event id and a replay header,
// until the order ends: deadline after the first send, then twice as long
// each time up to 8 deadlines. So an OrderExpired that payment
// dead-lettered (re-claimed as a replay), or a payment older than the event
// skipped (it was never claimed), is answered once payment can; a
// participant that applied it skips the copy by its id.
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
	grace     time.Duration // how long the outbox may hold a row before expiry pauses
	batch     int
	committed func() // after a sweep's OrderExpired events commit; may be nil

	behindAt time.Time // when a sweep last found the outbox behind
}

// maxResendDoublings caps the backoff between sends of one expiry at
// 2^3 = 8 deadlines.
const maxResendDoublings = 3

// NewExpirer returns the sweeper for orders older than deadline; their
// OrderExpired goes to topic through the outbox, and committed (when set)
// is called after each sweep that wrote some, to wake the relay.
func NewExpirer(log *slog.Logger, pool *pgxpool.Pool, topic string, deadline time.Duration, committed func()) *Expirer {
	return &Expirer{log: log, pool: pool, topic: topic, deadline: deadline,
		grace: min(max(deadline/10, time.Second), deadline), batch: 500, committed: committed}
}

// overdueSQL selects the orders whose next step the owing participant has
// held past the deadline ($1 seconds). The participant and event names are
// literals: status may not import the other participants (TestLayout).
// parked has no index on key: its uncorrelated IN is hashed once per sweep,
// not scanned per order.
const overdueSQL = `
	SELECT o.id FROM orders o
	WHERE o.status IN ('CREATED', 'INVENTORY_RESERVED') AND o.expired_at IS NULL
	  AND o.created_at < now() - make_interval(secs => $1)
	  AND (
	    EXISTS (SELECT 1 FROM order_events e JOIN inbox i ON i.event_id = e.event_id
	            WHERE e.order_id = o.id
	              AND e.type = CASE o.status WHEN 'CREATED' THEN 'OrderCreated' ELSE 'InventoryReserved' END
	              AND i.consumer = CASE o.status WHEN 'CREATED' THEN 'inventory' ELSE 'payment' END
	              AND i.processed_at < now() - make_interval(secs => $1))
	    OR EXISTS (SELECT 1 FROM dead_letters d
	               WHERE d.order_id = o.id
	                 AND d.participant = CASE o.status WHEN 'CREATED' THEN 'inventory' ELSE 'payment' END
	                 AND d.dead_at < now() - make_interval(secs => $1))
	    OR convert_to(o.id::text, 'UTF8') IN (SELECT p.key FROM parked p WHERE p.parked_at < now() - make_interval(secs => $1)))
	ORDER BY o.created_at LIMIT $2
	FOR UPDATE OF o SKIP LOCKED`

// resendSQL selects the expired orders still short of payment whose last
// send is older than its backoff: $1 seconds doubled per earlier send, at
// most $3 times. An expiry stamped by an older release has no id of its
// own; the one status recorded is taken, if any.
const resendSQL = `
	SELECT o.id, greatest(o.expiry_sends, 1),
	       coalesce(o.expiry_event_id, (SELECT e.event_id FROM order_events e
	                                    WHERE e.order_id = o.id AND e.type = 'OrderExpired' ORDER BY e.seq LIMIT 1))
	FROM orders o
	WHERE o.status IN ('CREATED', 'INVENTORY_RESERVED') AND o.expired_at IS NOT NULL
	  AND coalesce(o.expiry_sent_at, o.expired_at)
	      < now() - make_interval(secs => $1 * power(2, least(greatest(o.expiry_sends, 1) - 1, $3)))
	ORDER BY coalesce(o.expiry_sent_at, o.expired_at) LIMIT $2
	FOR UPDATE OF o SKIP LOCKED`

// Sweep expires up to one batch of overdue orders, sends up to one batch of
// unanswered expiries again, and counts the paid orders past the deadline.
// Nothing expires or is sent again while the outbox is behind. One Expirer
// is not for concurrent use; several may sweep one database at once.
func (x *Expirer) Sweep(ctx context.Context) (expired int, paidOverdue int64, err error) {
	paused, err := x.behind(ctx)
	if err != nil {
		return 0, 0, err
	}
	resent := 0
	if !paused {
		err = pgx.BeginFunc(ctx, x.pool, func(tx pgx.Tx) error {
			var err error
			if expired, err = x.expire(ctx, tx); err != nil {
				return err
			}
			resent, err = x.resend(ctx, tx)
			return err
		})
		if err != nil {
			return 0, 0, err
		}
	}
	if expired+resent > 0 && x.committed != nil {
		x.committed()
	}
	if resent > 0 {
		x.log.Info("expiries sent again: their orders have not ended", "orders", resent)
	}
	if paidOverdue, err = deadletter.PaidOverdue(ctx, x.pool, x.deadline); err != nil {
		return expired, 0, err
	}
	return expired, paidOverdue, nil
}

// behind reports whether expiry pauses: the outbox's oldest row is older
// than grace, or was so less than grace ago.
func (x *Expirer) behind(ctx context.Context) (bool, error) {
	var age float64
	if err := x.pool.QueryRow(ctx, `
		SELECT coalesce(extract(epoch FROM now() - (SELECT created_at FROM outbox ORDER BY id LIMIT 1)), 0)::float8`).Scan(&age); err != nil {
		return false, fmt.Errorf("reading the outbox's oldest row: %w", err)
	}
	now := time.Now()
	if time.Duration(age*float64(time.Second)) > x.grace {
		if x.behindAt.IsZero() || now.Sub(x.behindAt) > x.grace {
			x.log.Info("saga deadline paused: the outbox is behind", "oldest_row_age", time.Duration(age*float64(time.Second)).Round(time.Millisecond))
		}
		x.behindAt = now
		return true, nil
	}
	return !x.behindAt.IsZero() && now.Sub(x.behindAt) < x.grace, nil
}

// expire stamps and emits the first OrderExpired of up to one batch of
// overdue orders.
func (x *Expirer) expire(ctx context.Context, tx pgx.Tx) (int, error) {
	rows, err := tx.Query(ctx, overdueSQL, x.deadline.Seconds(), x.batch)
	if err != nil {
		return 0, fmt.Errorf("finding overdue orders: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return 0, fmt.Errorf("finding overdue orders: %w", err)
	}
	if len(ids) == 0 {
		return 0, nil
	}
	evs := make([]event.Event, len(ids))
	evIDs := make([]uuid.UUID, len(ids))
	for i, id := range ids {
		if evs[i], err = event.New(event.OrderExpired, id, Name, event.Expired{Deadline: x.deadline.String()}); err != nil {
			return 0, err
		}
		evIDs[i] = evs[i].ID
	}
	if _, err := tx.Exec(ctx, `
		UPDATE orders SET expired_at = now(), expiry_event_id = v.ev, expiry_sends = 1, expiry_sent_at = now()
		FROM unnest($1::uuid[], $2::uuid[]) AS v(id, ev) WHERE orders.id = v.id`, ids, evIDs); err != nil {
		return 0, fmt.Errorf("stamping %d expired orders: %w", len(ids), err)
	}
	return len(ids), event.Emit(ctx, tx, x.topic, evs...)
}

// resend sends the OrderExpired of up to one batch of expired orders that
// have not ended again, with its first id and a replay header: a
// participant that dead-lettered it re-claims it, one that never claimed
// it (a payment older than the event) takes it as new, and one that
// applied it skips it.
func (x *Expirer) resend(ctx context.Context, tx pgx.Tx) (int, error) {
	rows, err := tx.Query(ctx, resendSQL, x.deadline.Seconds(), x.batch, maxResendDoublings)
	if err != nil {
		return 0, fmt.Errorf("finding unanswered expiries: %w", err)
	}
	var ids, evIDs []uuid.UUID
	var sends []int32
	var id uuid.UUID
	var n int32
	var evID *uuid.UUID
	if _, err := pgx.ForEachRow(rows, []any{&id, &n, &evID}, func() error {
		ids, sends = append(ids, id), append(sends, n+1)
		if evID != nil {
			evIDs = append(evIDs, *evID)
		} else {
			evIDs = append(evIDs, uuid.Nil)
		}
		return nil
	}); err != nil {
		return 0, fmt.Errorf("finding unanswered expiries: %w", err)
	}
	if len(ids) == 0 {
		return 0, nil
	}
	recs := make([]*kgo.Record, len(ids))
	for i, id := range ids {
		ev, err := event.New(event.OrderExpired, id, Name, event.Expired{Deadline: x.deadline.String()})
		if err != nil {
			return 0, err
		}
		if evIDs[i] != uuid.Nil {
			ev.ID = evIDs[i]
		}
		evIDs[i] = ev.ID
		recs[i] = ev.Record(x.topic)
		recs[i].Headers = append(recs[i].Headers, kgo.RecordHeader{
			Key: deadletter.HeaderReplayOf, Value: []byte("expiry:" + strconv.Itoa(int(sends[i])))})
	}
	if _, err := tx.Exec(ctx, `
		UPDATE orders SET expiry_event_id = v.ev, expiry_sends = v.sends, expiry_sent_at = now()
		FROM unnest($1::uuid[], $2::uuid[], $3::int[]) AS v(id, ev, sends) WHERE orders.id = v.id`, ids, evIDs, sends); err != nil {
		return 0, fmt.Errorf("stamping %d expiries sent again: %w", len(ids), err)
	}
	if err := event.WriteOutbox(ctx, tx, recs...); err != nil {
		return 0, err
	}
	return len(ids), nil
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
