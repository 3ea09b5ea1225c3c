// Package inventory is the saga participant that owns stock: it reserves
// every item of a new order or none, and gives stock back when payment fails
// or is refunded.
package inventory

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
)

// Name is the participant's name, its event source and consumer group suffix.
const Name = "inventory"

// Inventory handles OrderCreated, PaymentFailed and PaymentRefunded.
type Inventory struct {
	log *slog.Logger
}

// New returns the inventory participant.
func New(log *slog.Logger) *Inventory { return &Inventory{log: log} }

// Handles reports the event types inventory acts on.
func (*Inventory) Handles(t event.Type) bool {
	return t == event.OrderCreated || t == event.PaymentFailed || t == event.PaymentRefunded
}

// Handle applies a batch inside the consumer's transaction and returns the
// events it emits. Releases are applied before reservations: stock given back
// by a declined order may serve a new one in the same batch. Out of stock is
// a business outcome (InventoryFailed), not an error.
func (inv *Inventory) Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	var orders []order
	var declined []uuid.UUID
	for _, ev := range evs {
		switch ev.Type {
		case event.OrderCreated:
			var c event.Created
			if err := ev.Decode(&c); err != nil {
				return nil, event.Reject(ev, err)
			}
			orders = append(orders, order{id: ev.OrderID, created: c})
		case event.PaymentFailed, event.PaymentRefunded:
			// A refund is the paid order's compensation, as a decline is
			// the unpaid one's: the stock goes back either way.
			declined = append(declined, ev.OrderID)
		}
	}
	released, err := apply(ctx, tx, declined, orders)
	if err != nil {
		return nil, fmt.Errorf("applying %d reservations and %d releases: %w", len(orders), len(declined), err)
	}
	var out []event.Event
	for _, id := range declined {
		items := released[id]
		if len(items) == 0 {
			continue // nothing held (already released, or never reserved)
		}
		ev, err := event.New(event.InventoryReleased, id, Name, event.Released{Items: items})
		if err != nil {
			return nil, err
		}
		out = append(out, ev)
	}
	for _, o := range orders {
		var ev event.Event
		if o.short != nil {
			msg := "out of stock"
			if o.short.Reason == CancelledReason {
				msg = "not reserved: the order was cancelled first"
			}
			inv.log.InfoContext(ctx, msg, "order_id", o.id, "product_id", o.short.ProductID, "reason", o.short.Reason)
			ev, err = event.New(event.InventoryFailed, o.id, Name, o.short)
		} else {
			ev, err = event.New(event.InventoryReserved, o.id, Name, event.Reserved(o.created))
		}
		if err != nil {
			return nil, err
		}
		out = append(out, ev)
	}
	return out, nil
}
