package inventory_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/inventory"
	"github.com/prozess/prozess/schema/schematest"
)

func setup(t *testing.T) (*pgxpool.Pool, *inventory.Inventory) {
	t.Parallel()
	pool := schematest.NewPool(t)
	schematest.Exec(t, pool, `INSERT INTO products (id, name, price_cents, stock) VALUES
		('a', 'A', 100, 5), ('b', 'B', 200, 2), ('c', 'C', 300, 0)`)
	return pool, inventory.New(slog.New(slog.NewTextHandler(io.Discard, nil)))
}

func created(t *testing.T, order uuid.UUID, items ...event.Item) event.Event {
	t.Helper()
	ev, err := event.New(event.OrderCreated, order, "api", event.Created{UserID: "u1", Items: items, AmountCents: 1})
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func handle(t *testing.T, pool *pgxpool.Pool, inv *inventory.Inventory, evs ...event.Event) []event.Event {
	t.Helper()
	return schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
		return inv.Handle(context.Background(), tx, evs)
	})
}

func stock(t *testing.T, pool *pgxpool.Pool, id string) int64 {
	return schematest.Int(t, pool, `SELECT stock FROM products WHERE id = $1`, id)
}

func TestReserveTakesEveryItem(t *testing.T) {
	pool, inv := setup(t)
	order := uuid.New()
	out := handle(t, pool, inv, created(t, order, event.Item{ProductID: "b", Qty: 2}, event.Item{ProductID: "a", Qty: 3}))
	if len(out) != 1 || out[0].Type != event.InventoryReserved || out[0].OrderID != order {
		t.Fatalf("emitted %+v, want one InventoryReserved", out)
	}
	if a, b := stock(t, pool, "a"), stock(t, pool, "b"); a != 2 || b != 0 {
		t.Fatalf("stock a=%d b=%d, want 2 and 0", a, b)
	}
}

func TestReserveIsAllOrNothing(t *testing.T) {
	for _, tc := range []struct {
		name    string
		items   []event.Item
		product string
	}{
		{"one item short", []event.Item{{ProductID: "a", Qty: 1}, {ProductID: "b", Qty: 3}}, "b"},
		{"zero stock", []event.Item{{ProductID: "a", Qty: 1}, {ProductID: "c", Qty: 1}}, "c"},
		{"unknown product", []event.Item{{ProductID: "a", Qty: 1}, {ProductID: "zzz", Qty: 1}}, "zzz"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pool, inv := setup(t)
			out := handle(t, pool, inv, created(t, uuid.New(), tc.items...))
			if len(out) != 1 || out[0].Type != event.InventoryFailed {
				t.Fatalf("emitted %+v, want one InventoryFailed", out)
			}
			var f event.Failed
			if err := out[0].Decode(&f); err != nil || f.ProductID != tc.product {
				t.Fatalf("failure %+v (%v), want product %s", f, err, tc.product)
			}
			if a, b := stock(t, pool, "a"), stock(t, pool, "b"); a != 5 || b != 2 {
				t.Fatalf("stock changed to a=%d b=%d on a failed reservation", a, b)
			}
			if n := schematest.Int(t, pool, `SELECT count(*) FROM reservations`); n != 0 {
				t.Fatalf("%d reservations after a failed reservation", n)
			}
		})
	}
}

func TestReleaseGivesStockBackOnce(t *testing.T) {
	pool, inv := setup(t)
	order := uuid.New()
	handle(t, pool, inv, created(t, order, event.Item{ProductID: "a", Qty: 4}, event.Item{ProductID: "b", Qty: 1}))
	for i := range 3 { // three distinct PaymentFailed events for one order
		failed, err := event.New(event.PaymentFailed, order, "payment", event.Failed{Reason: "declined"})
		if err != nil {
			t.Fatal(err)
		}
		out := handle(t, pool, inv, failed)
		if i == 0 && (len(out) != 1 || out[0].Type != event.InventoryReleased) {
			t.Fatalf("first release emitted %+v, want InventoryReleased", out)
		}
		if i > 0 && len(out) != 0 {
			t.Fatalf("release %d emitted %+v, want nothing", i+1, out)
		}
		if a, b := stock(t, pool, "a"), stock(t, pool, "b"); a != 5 || b != 2 {
			t.Fatalf("after release %d stock a=%d b=%d, want 5 and 2", i+1, a, b)
		}
	}
}

func TestReleaseWithoutReservationDoesNothing(t *testing.T) {
	pool, inv := setup(t)
	failed, _ := event.New(event.PaymentFailed, uuid.New(), "payment", event.Failed{Reason: "declined"})
	if out := handle(t, pool, inv, failed); len(out) != 0 {
		t.Fatalf("emitted %+v for an order holding nothing", out)
	}
}

// Many concurrent reservations, in crossing item orders, never oversell and
// never deadlock: products are locked in id order.
func TestConcurrentReservationsNeverOversell(t *testing.T) {
	pool, inv := setup(t)
	const n = 24
	var wg sync.WaitGroup
	results := make(chan event.Type, n)
	for i := range n {
		items := []event.Item{{ProductID: "a", Qty: 1}, {ProductID: "b", Qty: 1}}
		if i%2 == 1 {
			items[0], items[1] = items[1], items[0]
		}
		ev := created(t, uuid.New(), items...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := pgx.BeginFunc(context.Background(), pool, func(tx pgx.Tx) error {
				out, err := inv.Handle(context.Background(), tx, []event.Event{ev})
				if err == nil {
					results <- out[0].Type
				}
				return err
			})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	close(results)
	reserved := 0
	for r := range results {
		if r == event.InventoryReserved {
			reserved++
		}
	}
	if reserved != 2 {
		t.Fatalf("%d orders reserved with stock b=2, want exactly 2", reserved)
	}
	if a, b := stock(t, pool, "a"), stock(t, pool, "b"); a != 3 || b != 0 {
		t.Fatalf("stock a=%d b=%d, want 3 and 0", a, b)
	}
}

// One batch is decided in order against the stock left by the orders before
// it, and a release in the batch makes its stock available to the batch.
func TestBatchIsDecidedInOrder(t *testing.T) {
	pool, inv := setup(t)
	held := uuid.New()
	handle(t, pool, inv, created(t, held, event.Item{ProductID: "b", Qty: 2})) // b: 2 -> 0
	declined, err := event.New(event.PaymentFailed, held, "payment", event.Failed{Reason: "declined"})
	if err != nil {
		t.Fatal(err)
	}
	first, second, third := uuid.New(), uuid.New(), uuid.New()
	out := handle(t, pool, inv,
		created(t, first, event.Item{ProductID: "a", Qty: 4}),  // a: 5 -> 1
		created(t, second, event.Item{ProductID: "a", Qty: 2}), // short: 1 left
		declined, // b: 0 -> 2
		created(t, third, event.Item{ProductID: "a", Qty: 1}, event.Item{ProductID: "b", Qty: 2}), // a: 1 -> 0, b: 2 -> 0
	)
	got := map[uuid.UUID]event.Type{}
	for _, ev := range out {
		got[ev.OrderID] = ev.Type
	}
	want := map[uuid.UUID]event.Type{held: event.InventoryReleased, first: event.InventoryReserved,
		second: event.InventoryFailed, third: event.InventoryReserved}
	for id, typ := range want {
		if got[id] != typ {
			t.Errorf("order %s: %s, want %s", id, got[id], typ)
		}
	}
	if a, b := stock(t, pool, "a"), stock(t, pool, "b"); a != 0 || b != 0 {
		t.Fatalf("stock a=%d b=%d, want 0 and 0", a, b)
	}
}

// BenchmarkReserveBatch measures one polled batch of 100 new orders through
// inventory, in one transaction, on the real database.
func BenchmarkReserveBatch(b *testing.B) {
	pool := schematest.NewPool(b)
	schematest.Exec(b, pool, `INSERT INTO products (id, name, price_cents, stock) VALUES ('a', 'A', 1, 1000000000), ('b', 'B', 1, 1000000000)`)
	inv := inventory.New(slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		evs := make([]event.Event, 100)
		for i := range evs {
			evs[i], _ = event.New(event.OrderCreated, uuid.New(), "api",
				event.Created{UserID: "u", Items: []event.Item{{ProductID: "a", Qty: 1}, {ProductID: "b", Qty: 2}}, AmountCents: 3})
		}
		if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { _, err := inv.Handle(ctx, tx, evs); return err }); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/100, "µs/order")
}

func paymentFailed(t *testing.T, order uuid.UUID) event.Event {
	t.Helper()
	ev, err := event.New(event.PaymentFailed, order, "payment", event.Failed{Reason: "saga deadline passed before payment"})
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

// A release that finds nothing to give back (the order expired before
// inventory reserved anything) is remembered: the OrderCreated that comes
// after it (late, replayed, or behind it in the same batch) gets
// InventoryFailed and takes no stock. After a matched release, a replayed
// OrderCreated is refused too, and nothing is given back twice.
func TestReservationAfterItsReleaseFails(t *testing.T) {
	for _, tc := range []struct {
		name    string
		batches func(t *testing.T, o uuid.UUID) [][]event.Event
	}{
		{"release first, two batches", func(t *testing.T, o uuid.UUID) [][]event.Event {
			return [][]event.Event{{paymentFailed(t, o)}, {created(t, o, event.Item{ProductID: "a", Qty: 2})}}
		}},
		{"release first, one batch", func(t *testing.T, o uuid.UUID) [][]event.Event {
			return [][]event.Event{{paymentFailed(t, o), created(t, o, event.Item{ProductID: "a", Qty: 2})}}
		}},
		// The topic's order when inventory lags an expiry: OrderCreated,
		// then the PaymentFailed answering OrderExpired, in one batch;
		// releases apply first, so the reservation finds the order cancelled.
		{"created first, one batch", func(t *testing.T, o uuid.UUID) [][]event.Event {
			return [][]event.Event{{created(t, o, event.Item{ProductID: "a", Qty: 2}), paymentFailed(t, o)}}
		}},
		{"matched release, then a replayed OrderCreated", func(t *testing.T, o uuid.UUID) [][]event.Event {
			c := created(t, o, event.Item{ProductID: "a", Qty: 2})
			replayed := c
			replayed.ID = uuid.New() // past the inbox's memory: a new id as far as it knows
			return [][]event.Event{{c}, {paymentFailed(t, o)}, {replayed}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pool, inv := setup(t)
			order := uuid.New()
			var out []event.Event
			for _, b := range tc.batches(t, order) {
				out = append(out, handle(t, pool, inv, b...)...)
			}
			last := out[len(out)-1]
			var f event.Failed
			if last.Type != event.InventoryFailed || last.Decode(&f) != nil || f.Reason != inventory.CancelledReason {
				t.Fatalf("emitted %+v, want it to end with InventoryFailed (%s)", out, inventory.CancelledReason)
			}
			if a := stock(t, pool, "a"); a != 5 {
				t.Fatalf("stock a=%d, want 5: nothing held for a cancelled order", a)
			}
			if n := schematest.Int(t, pool, `SELECT count(*) FROM reservations WHERE order_id = $1 AND released_at IS NULL`, order); n != 0 {
				t.Fatalf("%d reservation lines held", n)
			}
		})
	}
}

// An order inventory could not serve stays cancelled: its OrderCreated
// coming again after the inbox forgot it (the inbox row pruned while the
// record is still on the topic, or a consumer group restarting at the log
// start) gets InventoryFailed again, even with the stock back by then, so
// nothing is reserved, charged or shipped for an order shown CANCELLED.
func TestOutOfStockOrderStaysCancelledWhenReplayed(t *testing.T) {
	pool, inv := setup(t)
	order := uuid.New()
	c := created(t, order, event.Item{ProductID: "c", Qty: 1})
	schematest.Exec(t, pool, `INSERT INTO inbox (consumer, event_id) VALUES ($1, $2)`, inventory.Name, c.ID)
	if out := handle(t, pool, inv, c); len(out) != 1 || out[0].Type != event.InventoryFailed {
		t.Fatalf("emitted %+v, want InventoryFailed (c is out of stock)", out)
	}
	// Stock arrives, and the inbox row is pruned: the consumer would hand
	// the same OrderCreated to Handle again.
	schematest.Exec(t, pool, `UPDATE products SET stock = 3 WHERE id = 'c'`)
	schematest.Exec(t, pool, `DELETE FROM inbox WHERE consumer = $1 AND event_id = $2`, inventory.Name, c.ID)
	out := handle(t, pool, inv, c)
	var f event.Failed
	if len(out) != 1 || out[0].Type != event.InventoryFailed || out[0].Decode(&f) != nil || f.Reason != inventory.CancelledReason {
		t.Fatalf("replayed OrderCreated emitted %+v, want InventoryFailed (%s)", out, inventory.CancelledReason)
	}
	if s := stock(t, pool, "c"); s != 3 {
		t.Fatalf("stock c=%d, want 3: nothing reserved for a cancelled order", s)
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM reservations WHERE order_id = $1`, order); n != 0 {
		t.Fatalf("%d reservation lines for a cancelled order", n)
	}
}
