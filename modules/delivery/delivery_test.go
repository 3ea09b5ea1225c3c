package delivery_test

import (
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/delivery"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

func TestShipsOncePerOrder(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	d := delivery.New(slog.New(slog.NewTextHandler(io.Discard, nil)))
	order := uuid.New()
	var shipped []event.Event
	for range 3 {
		paid, err := event.New(event.PaymentCompleted, order, "payment", event.Paid{PaymentID: uuid.New(), AmountCents: 1})
		if err != nil {
			t.Fatal(err)
		}
		shipped = append(shipped, schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
			return d.Handle(context.Background(), tx, []event.Event{paid, paid})
		})...)
	}
	if len(shipped) != 1 || shipped[0].Type != event.OrderShipped {
		t.Fatalf("emitted %+v, want one OrderShipped", shipped)
	}
	var s event.Shipped
	if err := shipped[0].Decode(&s); err != nil || s.Carrier != delivery.Carrier || s.Tracking == "" {
		t.Fatalf("shipment %+v (%v)", s, err)
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM shipments WHERE order_id = $1 AND id = $2`, order, s.ShipmentID); n != 1 {
		t.Fatalf("%d shipments stored, want 1", n)
	}
}
