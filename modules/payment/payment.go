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

// CancelledReason is the reason of the PaymentFailed that answers an
// OrderCancelRequested reaching payment before its charge: the order is
// cancelled without being charged.
const CancelledReason = "order cancelled before payment"

// Payment handles InventoryReserved, OrderExpired, OrderCancelRequested and
// ShipmentCancelled.
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
	return t == event.InventoryReserved || t == event.OrderExpired || t == event.OrderCancelRequested || t == event.ShipmentCancelled
}

// Handle charges a batch of orders with one INSERT. A decline is a business
// outcome (PaymentFailed), not an error. An OrderExpired is a decision too:
// a stored decline without a charge, unless the order's payment was decided
// already (then it is paid, or declined and compensated, and the expiry
// changes nothing). Whichever of an order's InventoryReserved and
// OrderExpired comes first in the topic decides; the other finds the
// decision stored, so an expired order is never charged and a paid one
// never cancelled. An OrderCancelRequested is decided the same way (a
// cancel after the charge is answered by delivery instead: it ships, or
// sends ShipmentCancelled, which payment answers with a refund).
func (p *Payment) Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	type charge struct {
		order    uuid.UUID
		id       uuid.UUID
		amount   int64
		declined bool
		reason   string // why a decline that is no simulated one
	}
	var refunds []event.Event
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
			c = charge{order: ev.OrderID, declined: true, reason: ExpiredReason}
		case event.OrderCancelRequested:
			var x event.CancelRequested
			if err := ev.Decode(&x); err != nil {
				return nil, event.Reject(ev, err)
			}
			c = charge{order: ev.OrderID, declined: true, reason: CancelledReason}
		case event.ShipmentCancelled:
			var x event.Failed
			if err := ev.Decode(&x); err != nil {
				return nil, event.Reject(ev, err)
			}
			refunds = append(refunds, ev)
			continue
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
		case c.reason != "":
			status, reason = "DECLINED", c.reason
		case c.declined:
			status, reason = "DECLINED", DeclineReason
		}
		cs = append(cs, c)
		orders, ids, amounts = append(orders, c.order), append(ids, c.id), append(amounts, c.amount)
		statuses, reasons = append(statuses, status), append(reasons, reason)
	}
	out, err := p.refund(ctx, tx, refunds)
	if err != nil || len(cs) == 0 {
		return out, err
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
	for _, c := range cs {
		if !decided[c.id] {
			// Decided before under another event id: that decision's event
			// is already in the outbox, so emitting again would charge twice.
			if c.reason != "" {
				p.log.InfoContext(ctx, "order expired or cancelled after its payment was decided; the decision stands", "order_id", c.order, "reason", c.reason)
			} else {
				// Expected after an expiry or a cancel decided first; else a
				// redelivery the inbox no longer remembered.
				p.log.InfoContext(ctx, "payment already decided (expired or cancelled first, or a redelivery): no charge", "order_id", c.order)
			}
			continue
		}
		var ev event.Event
		if c.reason != "" {
			ev, err = event.New(event.PaymentFailed, c.order, Name, event.Failed{Reason: c.reason})
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

// refund gives back the completed payment of each order delivery declined
// to ship, with one INSERT: the refund row (one per order, ON CONFLICT) is
// the decision, so a redelivered ShipmentCancelled refunds nothing more.
// An order without a completed payment has nothing to refund (delivery
// only withholds paid orders, so that is a record from elsewhere, logged).
func (p *Payment) refund(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	if len(evs) == 0 {
		return nil, nil
	}
	orders, ids := make([]uuid.UUID, len(evs)), make([]uuid.UUID, len(evs))
	for i, ev := range evs {
		id, err := uuid.NewV7()
		if err != nil {
			return nil, fmt.Errorf("new refund id: %w", err)
		}
		orders[i], ids[i] = ev.OrderID, id
	}
	rows, err := tx.Query(ctx, `
		INSERT INTO refunds (order_id, id, payment_id, amount_cents)
		SELECT p.order_id, v.id, p.id, p.amount_cents
		FROM unnest($1::uuid[], $2::uuid[]) AS v(o, id) JOIN payments p ON p.order_id = v.o AND p.status = 'COMPLETED'
		ON CONFLICT (order_id) DO NOTHING
		RETURNING order_id, id, payment_id, amount_cents`, orders, ids)
	if err != nil {
		return nil, fmt.Errorf("recording %d refunds: %w", len(evs), err)
	}
	var out []event.Event
	refunded := map[uuid.UUID]bool{}
	var order uuid.UUID
	var r event.Refunded
	if _, err := pgx.ForEachRow(rows, []any{&order, &r.RefundID, &r.PaymentID, &r.AmountCents}, func() error {
		ev, err := event.New(event.PaymentRefunded, order, Name, r)
		refunded[order] = true
		out = append(out, ev)
		return err
	}); err != nil {
		return nil, fmt.Errorf("recording %d refunds: %w", len(evs), err)
	}
	for _, id := range orders {
		if !refunded[id] {
			p.log.WarnContext(ctx, "shipment cancelled, but no refund due: refunded already, or never charged", "order_id", id)
		}
	}
	return out, nil
}

func (p *Payment) decline() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rng.Float64() < p.declineRate
}
