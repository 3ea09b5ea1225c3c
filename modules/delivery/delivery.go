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

// CancelledReason is the reason of a ShipmentCancelled.
const CancelledReason = "order cancelled before shipping"

// Handle creates each paid order's one shipment, with one INSERT per batch,
// and announces it; a paid order whose cancel came first is withheld
// instead (ShipmentCancelled, which payment answers with a refund).
//
// Cancel and shipment exclude each other through the order's row: the api
// stamps orders.cancel_requested_at holding the row FOR UPDATE and refuses
// (409) once a shipment exists; delivery reads the stamp holding the rows
// FOR KEY SHARE, which waits for such a cancel to commit and does not wait
// for the status participant's updates. Whichever commits first wins, so
// an order is never both shipped and refunded.
func (d *Delivery) Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	var paid []uuid.UUID
	for _, ev := range evs {
		if ev.Type == event.PaymentCompleted {
			paid = append(paid, ev.OrderID)
		}
	}
	if len(paid) == 0 {
		return nil, nil
	}
	cancelled, err := cancelRequested(ctx, tx, paid)
	if err != nil {
		return nil, err
	}
	out, err := d.withhold(ctx, tx, cancelled)
	if err != nil {
		return nil, err
	}
	var orders, ids []uuid.UUID
	var trackings []string
	for _, o := range paid {
		if cancelled[o] {
			continue
		}
		id, err := uuid.NewV7()
		if err != nil {
			return nil, fmt.Errorf("new shipment id: %w", err)
		}
		orders, ids = append(orders, o), append(ids, id)
		trackings = append(trackings, "PZ"+strings.ToUpper(strings.ReplaceAll(id.String(), "-", "")[20:]))
	}
	if len(orders) == 0 {
		return out, nil
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

// cancelRequested locks the paid orders' rows (FOR KEY SHARE, in id order)
// and reports which have a cancel request.
func cancelRequested(ctx context.Context, tx pgx.Tx, orders []uuid.UUID) (map[uuid.UUID]bool, error) {
	// Every paid order's row is locked, not only the cancelled ones: a
	// cancel committing after this read must wait for the shipment, and
	// then find it.
	rows, err := tx.Query(ctx, `
		SELECT id, cancel_requested_at IS NOT NULL FROM orders WHERE id = ANY($1)
		ORDER BY id FOR KEY SHARE`, orders)
	if err != nil {
		return nil, fmt.Errorf("reading the cancels of %d paid orders: %w", len(orders), err)
	}
	cancelled := map[uuid.UUID]bool{}
	var id uuid.UUID
	var requested bool
	if _, err := pgx.ForEachRow(rows, []any{&id, &requested}, func() error {
		if requested {
			cancelled[id] = true
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("reading the cancels of %d paid orders: %w", len(orders), err)
	}
	return cancelled, nil
}

// withhold records each cancelled paid order as not shipped, once (a
// redelivered PaymentCompleted finds the row), and announces it.
func (d *Delivery) withhold(ctx context.Context, tx pgx.Tx, cancelled map[uuid.UUID]bool) ([]event.Event, error) {
	if len(cancelled) == 0 {
		return nil, nil
	}
	orders := make([]uuid.UUID, 0, len(cancelled))
	for id := range cancelled {
		orders = append(orders, id)
	}
	rows, err := tx.Query(ctx, `
		INSERT INTO withheld_shipments (order_id)
		SELECT o FROM unnest($1::uuid[]) AS o
		WHERE NOT EXISTS (SELECT 1 FROM shipments s WHERE s.order_id = o)
		ON CONFLICT (order_id) DO NOTHING
		RETURNING order_id`, orders)
	if err != nil {
		return nil, fmt.Errorf("withholding %d cancelled orders: %w", len(orders), err)
	}
	withheld, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, fmt.Errorf("withholding %d cancelled orders: %w", len(orders), err)
	}
	var out []event.Event
	for _, id := range withheld {
		d.log.InfoContext(ctx, "paid order not shipped: its cancel came first", "order_id", id)
		ev, err := event.New(event.ShipmentCancelled, id, Name, event.Failed{Reason: CancelledReason})
		if err != nil {
			return nil, err
		}
		out = append(out, ev)
	}
	return out, nil
}
