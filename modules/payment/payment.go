// Package payment is the saga participant that charges orders whose stock is
// reserved. Charging is simulated: a configurable share of payments is
// declined at random. The decision is stored, so a redelivered
// InventoryReserved can never charge twice.
package payment

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
)

// Name is the participant's name, its event source and consumer group suffix.
const Name = "payment"

// DeclineReason is the reason a simulated decline gives.
const DeclineReason = "card declined (simulated)"

// ExpiredReason is the reason of the PaymentFailed that answers an
// OrderExpired: the order is cancelled without being charged.
const ExpiredReason = "saga deadline passed before payment"

// Payment handles InventoryReserved.
type Payment struct {
	log         *slog.Logger
	declineRate float64
	mu          sync.Mutex // guards rng
	rng         *rand.Rand
}

// New returns the payment participant, declining a share declineRate (0 to
// 1) of payments, drawn from rng.
func New(log *slog.Logger, declineRate float64, rng *rand.Rand) (*Payment, error) {
	if declineRate < 0 || declineRate > 1 {
		return nil, fmt.Errorf("decline rate %v is not between 0 and 1", declineRate)
	}
	return &Payment{log: log, declineRate: declineRate, rng: rng}, nil
}

// Handles reports the event types payment acts on.
func (*Payment) Handles(t event.Type) bool {
	return t == event.InventoryReserved || t == event.OrderExpired
}

// Handle charges a batch of orders with one INSERT. A decline is a business
// outcome (PaymentFailed), not an error. An OrderExpired is a decision too:
// a stored decline without a charge, unless the order's payment was decided
// already (then it is paid, or declined and compensated, and the expiry
// changes nothing). Whichever of an order's InventoryReserved and
// OrderExpired comes first in the topic decides; the other finds the
// decision stored, so an expired order is never charged and a paid one
// never cancelled.
func (p *Payment) Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	type charge struct {
		order    uuid.UUID
		id       uuid.UUID
		amount   int64
		declined bool
		expired  bool
	}
	var cs []charge
	var orders, ids []uuid.UUID
	var amounts []int64
	var statuses, reasons []string
	for _, ev := range evs {
		var c charge
		switch ev.Type {
		case event.InventoryReserved:
			var r event.Reserved
			if err := ev.Decode(&r); err != nil {
				return nil, event.Reject(ev, err)
			}
			c = charge{order: ev.OrderID, amount: r.AmountCents, declined: p.decline()}
		case event.OrderExpired:
			var x event.Expired
			if err := ev.Decode(&x); err != nil {
				return nil, event.Reject(ev, err)
			}
			c = charge{order: ev.OrderID, declined: true, expired: true}
		default:
			continue
		}
		id, err := uuid.NewV7()
		if err != nil {
			return nil, fmt.Errorf("new payment id: %w", err)
		}
		c.id = id
		status, reason := "COMPLETED", ""
		switch {
		case c.expired:
			status, reason = "DECLINED", ExpiredReason
		case c.declined:
			status, reason = "DECLINED", DeclineReason
		}
		cs = append(cs, c)
		orders, ids, amounts = append(orders, c.order), append(ids, c.id), append(amounts, c.amount)
		statuses, reasons = append(statuses, status), append(reasons, reason)
	}
	if len(cs) == 0 {
		return nil, nil
	}
	rows, err := tx.Query(ctx, `
		INSERT INTO payments (order_id, id, amount_cents, status, reason)
		SELECT o, i, a, s, NULLIF(r, '') FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[]) AS t(o, i, a, s, r)
		ON CONFLICT (order_id) DO NOTHING
		RETURNING id`, orders, ids, amounts, statuses, reasons)
	if err != nil {
		return nil, fmt.Errorf("recording %d payments: %w", len(cs), err)
	}
	stored, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, fmt.Errorf("recording %d payments: %w", len(cs), err)
	}
	decided := make(map[uuid.UUID]bool, len(stored))
	for _, id := range stored {
		decided[id] = true
	}
	var out []event.Event
	for _, c := range cs {
		if !decided[c.id] {
			// Decided before under another event id: that decision's event
			// is already in the outbox, so emitting again would charge twice.
			if c.expired {
				p.log.InfoContext(ctx, "order expired after its payment was decided; the decision stands", "order_id", c.order)
			} else {
				p.log.WarnContext(ctx, "payment already decided", "order_id", c.order)
			}
			continue
		}
		var ev event.Event
		if c.expired {
			ev, err = event.New(event.PaymentFailed, c.order, Name, event.Failed{Reason: ExpiredReason})
		} else if c.declined {
			ev, err = event.New(event.PaymentFailed, c.order, Name, event.Failed{Reason: DeclineReason})
		} else {
			ev, err = event.New(event.PaymentCompleted, c.order, Name, event.Paid{PaymentID: c.id, AmountCents: c.amount})
		}
		if err != nil {
			return nil, err
		}
		out = append(out, ev)
	}
	return out, nil
}

func (p *Payment) decline() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rng.Float64() < p.declineRate
}
