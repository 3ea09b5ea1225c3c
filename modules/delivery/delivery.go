// Package delivery is the saga participant that ships paid orders.
package delivery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
)

// Name is the participant's name, its event source and consumer group suffix.
const Name = "delivery"

// Carrier is the simulated carrier every shipment goes with.
const Carrier = "prozess-post"

// Delivery handles PaymentCompleted.
type Delivery struct {
	log *slog.Logger
}

// New returns the delivery participant.
func New(log *slog.Logger) *Delivery { return &Delivery{log: log} }

// Handles reports the event types delivery acts on.
func (*Delivery) Handles(t event.Type) bool { return t == event.PaymentCompleted }

// Handle creates the order's one shipment and announces it.
func (d *Delivery) Handle(ctx context.Context, tx pgx.Tx, ev event.Event) ([]event.Event, error) {
	if ev.Type != event.PaymentCompleted {
		return nil, nil
	}
	id, err := uuid.NewV7()
	if err != nil {
		return nil, fmt.Errorf("new shipment id: %w", err)
	}
	tracking := "PZ" + strings.ToUpper(strings.ReplaceAll(id.String(), "-", "")[20:])
	err = tx.QueryRow(ctx, `
		INSERT INTO shipments (order_id, id, carrier, tracking) VALUES ($1, $2, $3, $4)
		ON CONFLICT (order_id) DO NOTHING
		RETURNING id`, ev.OrderID, id, Carrier, tracking).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		d.log.Warn("order already shipped", "order_id", ev.OrderID)
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("creating shipment for order %s: %w", ev.OrderID, err)
	}
	out, err := event.New(event.OrderShipped, ev.OrderID, Name, event.Shipped{ShipmentID: id, Carrier: Carrier, Tracking: tracking})
	return []event.Event{out}, err
}
