// Package inventory is the saga participant that owns stock: it reserves
// every item of a new order or none, and gives stock back when payment fails.
package inventory

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
)

// Name is the participant's name, its event source and consumer group suffix.
const Name = "inventory"

// Inventory handles OrderCreated and PaymentFailed.
type Inventory struct {
	log *slog.Logger
}

// New returns the inventory participant.
func New(log *slog.Logger) *Inventory { return &Inventory{log: log} }

// Handles reports the event types inventory acts on.
func (*Inventory) Handles(t event.Type) bool {
	return t == event.OrderCreated || t == event.PaymentFailed
}

// Handle applies one event inside the consumer's transaction and returns the
// events it emits. Out of stock is a business outcome (InventoryFailed), not
// an error.
func (inv *Inventory) Handle(ctx context.Context, tx pgx.Tx, ev event.Event) ([]event.Event, error) {
	switch ev.Type {
	case event.OrderCreated:
		return inv.reserve(ctx, tx, ev)
	case event.PaymentFailed:
		return inv.release(ctx, tx, ev)
	}
	return nil, nil
}

func (inv *Inventory) reserve(ctx context.Context, tx pgx.Tx, ev event.Event) ([]event.Event, error) {
	var c event.Created
	if err := ev.Decode(&c); err != nil {
		return nil, err
	}
	short, err := reserve(ctx, tx, ev.OrderID, c.Items)
	if err != nil {
		return nil, fmt.Errorf("reserving stock for order %s: %w", ev.OrderID, err)
	}
	if short != nil {
		inv.log.Info("out of stock", "order_id", ev.OrderID, "product_id", short.ProductID, "reason", short.Reason)
		out, err := event.New(event.InventoryFailed, ev.OrderID, Name, short)
		return []event.Event{out}, err
	}
	out, err := event.New(event.InventoryReserved, ev.OrderID, Name, event.Reserved(c))
	return []event.Event{out}, err
}

func (inv *Inventory) release(ctx context.Context, tx pgx.Tx, ev event.Event) ([]event.Event, error) {
	items, err := release(ctx, tx, ev.OrderID)
	if err != nil {
		return nil, fmt.Errorf("releasing stock for order %s: %w", ev.OrderID, err)
	}
	if len(items) == 0 {
		// Nothing held (already released, or never reserved): nothing to give back.
		return nil, nil
	}
	out, err := event.New(event.InventoryReleased, ev.OrderID, Name, event.Released{Items: items})
	return []event.Event{out}, err
}
