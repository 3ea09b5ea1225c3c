// Package payment is the saga participant that charges orders whose stock is
// reserved. Charging is simulated: a configurable share of payments is
// declined at random. The decision is stored, so a redelivered
// InventoryReserved can never charge twice.
package payment

import (
	"context"
	"errors"
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
func (*Payment) Handles(t event.Type) bool { return t == event.InventoryReserved }

// Handle charges one order. A decline is a business outcome (PaymentFailed),
// not an error.
func (p *Payment) Handle(ctx context.Context, tx pgx.Tx, ev event.Event) ([]event.Event, error) {
	if ev.Type != event.InventoryReserved {
		return nil, nil
	}
	var r event.Reserved
	if err := ev.Decode(&r); err != nil {
		return nil, err
	}
	id, err := uuid.NewV7()
	if err != nil {
		return nil, fmt.Errorf("new payment id: %w", err)
	}
	declined := p.decline()
	status, reason := "COMPLETED", ""
	if declined {
		status, reason = "DECLINED", DeclineReason
	}
	err = tx.QueryRow(ctx, `
		INSERT INTO payments (order_id, id, amount_cents, status, reason)
		VALUES ($1, $2, $3, $4, NULLIF($5, ''))
		ON CONFLICT (order_id) DO NOTHING
		RETURNING id`, ev.OrderID, id, r.AmountCents, status, reason).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		// Decided before under another event id: that decision's event is
		// already in the outbox, so emitting again would be a second charge.
		p.log.Warn("payment already decided", "order_id", ev.OrderID)
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("recording payment for order %s: %w", ev.OrderID, err)
	}
	var out event.Event
	if declined {
		out, err = event.New(event.PaymentFailed, ev.OrderID, Name, event.Failed{Reason: reason})
	} else {
		out, err = event.New(event.PaymentCompleted, ev.OrderID, Name, event.Paid{PaymentID: id, AmountCents: r.AmountCents})
	}
	return []event.Event{out}, err
}

func (p *Payment) decline() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rng.Float64() < p.declineRate
}
