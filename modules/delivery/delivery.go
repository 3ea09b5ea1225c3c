// Package delivery is the saga participant that ships paid orders.
package delivery

import (
	"context"
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

// Handle creates each paid order's one shipment, with one INSERT per batch,
// and announces it.
func (d *Delivery) Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	var orders, ids []uuid.UUID
	var trackings []string
	for _, ev := range evs {
		if ev.Type != event.PaymentCompleted {
			continue
		}
		id, err := uuid.NewV7()
		if err != nil {
			return nil, fmt.Errorf("new shipment id: %w", err)
		}
		orders, ids = append(orders, ev.OrderID), append(ids, id)
		trackings = append(trackings, "PZ"+strings.ToUpper(strings.ReplaceAll(id.String(), "-", "")[20:]))
	}
	if len(orders) == 0 {
		return nil, nil
	}
	rows, err := tx.Query(ctx, `
		INSERT INTO shipments (order_id, id, carrier, tracking)
		SELECT o, i, $3, t FROM unnest($1::uuid[], $2::uuid[], $4::text[]) AS s(o, i, t)
		ON CONFLICT (order_id) DO NOTHING
		RETURNING id`, orders, ids, Carrier, trackings)
	if err != nil {
		return nil, fmt.Errorf("creating %d shipments: %w", len(orders), err)
	}
	stored, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, fmt.Errorf("creating %d shipments: %w", len(orders), err)
	}
	created := make(map[uuid.UUID]bool, len(stored))
	for _, id := range stored {
		created[id] = true
	}
	var out []event.Event
	for i, id := range ids {
		if !created[id] {
			d.log.WarnContext(ctx, "order already shipped", "order_id", orders[i])
			continue
		}
		ev, err := event.New(event.OrderShipped, orders[i], Name, event.Shipped{ShipmentID: id, Carrier: Carrier, Tracking: trackings[i]})
		if err != nil {
			return nil, err
		}
		out = append(out, ev)
	}
	return out, nil
}
