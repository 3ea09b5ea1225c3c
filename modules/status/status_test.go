package status_test

import (
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/status"
	"github.com/prozess/prozess/modules/statuscache"
	"github.com/prozess/prozess/schema/schematest"
)

func ev(t *testing.T, typ event.Type, order uuid.UUID) event.Event {
	t.Helper()
	e, err := event.New(typ, order, "test", map[string]string{})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// Status only moves forward: late, duplicate and out-of-order events never
// move it back, and every event lands in the audit log once.
func TestStatusOnlyMovesForward(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	rdb, prefix := schematest.NewRedis(t)
	cache := statuscache.New(rdb, prefix)
	s := status.New(slog.New(slog.NewTextHandler(io.Discard, nil)), cache)
	ctx := context.Background()
	order := uuid.New()
	schematest.Exec(t, pool, `INSERT INTO orders (id, user_id, status, amount_cents) VALUES ($1, 'u1', 'CREATED', 1)`, order)
	if err := cache.Put(ctx, order, statuscache.Entry{Doc: []byte(`{}`), Status: event.StatusCreated}); err != nil {
		t.Fatal(err)
	}
	paid := ev(t, event.PaymentCompleted, order)
	steps := []struct {
		ev   event.Event
		want event.Status
	}{
		{ev(t, event.InventoryReserved, order), event.StatusReserved},
		{paid, event.StatusPaid},
		{ev(t, event.InventoryReserved, order), event.StatusPaid}, // late
		{ev(t, event.OrderCreated, order), event.StatusPaid},      // replayed from the start
		{paid, event.StatusPaid},                                  // duplicate
		{ev(t, event.OrderShipped, order), event.StatusShipped},
		{ev(t, event.PaymentFailed, order), event.StatusShipped}, // terminal stays
	}
	for i, st := range steps {
		schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) { return s.Handle(ctx, tx, []event.Event{st.ev}) })
		s.AfterCommit(ctx, []event.Event{st.ev})
		var got event.Status
		if err := pool.QueryRow(ctx, `SELECT status FROM orders WHERE id = $1`, order).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != st.want {
			t.Fatalf("step %d (%s): status %s, want %s", i, st.ev.Type, got, st.want)
		}
		e, ok, err := cache.Get(ctx, order)
		if err != nil || !ok || e.Status != st.want {
			t.Fatalf("step %d (%s): cache %+v %v %v, want %s", i, st.ev.Type, e, ok, err, st.want)
		}
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM order_events WHERE order_id = $1`, order); n != int64(len(steps)-1) {
		t.Fatalf("%d audit rows, want %d (the duplicate once)", n, len(steps)-1)
	}
}

// The stale-status race: the api commits an order and, slowly, fills the
// cache with the CREATED it wrote; meanwhile the saga ran and the status
// writer advanced the order to SHIPPED while no entry existed. The late
// fill must not leave CREATED in the cache (before, it did, for the entry's
// lifetime): it adds the document and keeps SHIPPED.
func TestLateFillCannotWriteAnOlderStatus(t *testing.T) {
	t.Parallel()
	rdb, prefix := schematest.NewRedis(t)
	cache := statuscache.New(rdb, prefix)
	ctx := context.Background()
	order := uuid.New()
	if err := cache.Advance(ctx, []statuscache.Update{{OrderID: order, Status: event.StatusShipped}}); err != nil {
		t.Fatal(err)
	}
	if err := cache.Put(ctx, order, statuscache.Entry{Doc: []byte(`{"order":1}`), Status: event.StatusCreated}); err != nil {
		t.Fatal(err)
	}
	e, ok, err := cache.Get(ctx, order)
	if err != nil || !ok || e.Status != event.StatusShipped {
		t.Fatalf("after the late fill the cache holds %+v (%v, %v), want SHIPPED", e, ok, err)
	}
}

// The status writer never creates a readable cache entry: it has no
// document for it, and the next read fills it from PostgreSQL.
func TestCacheAdvanceSkipsAbsentEntries(t *testing.T) {
	t.Parallel()
	rdb, prefix := schematest.NewRedis(t)
	cache := statuscache.New(rdb, prefix)
	ctx := context.Background()
	order := uuid.New()
	if err := cache.Advance(ctx, []statuscache.Update{{OrderID: order, Status: event.StatusPaid}}); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := cache.Get(ctx, order); ok || err != nil {
		t.Fatalf("entry created by Advance (err %v)", err)
	}
	// A fill with an older status than the cache holds loses.
	if err := cache.Put(ctx, order, statuscache.Entry{Doc: []byte(`{"a":1}`), Status: event.StatusShipped}); err != nil {
		t.Fatal(err)
	}
	if err := cache.Put(ctx, order, statuscache.Entry{Doc: []byte(`{"a":2}`), Status: event.StatusReserved}); err != nil {
		t.Fatal(err)
	}
	e, ok, err := cache.Get(ctx, order)
	if err != nil || !ok || e.Status != event.StatusShipped || string(e.Doc) != `{"a":1}` {
		t.Fatalf("cache %+v %v %v, want the SHIPPED entry", e, ok, err)
	}
}

// A batch moves each order to the furthest status its events reach, in
// whatever order they come.
func TestBatchTakesTheFurthestStatus(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	rdb, prefix := schematest.NewRedis(t)
	s := status.New(slog.New(slog.NewTextHandler(io.Discard, nil)), statuscache.New(rdb, prefix))
	ctx := context.Background()
	a, b := uuid.New(), uuid.New()
	for _, id := range []uuid.UUID{a, b} {
		schematest.Exec(t, pool, `INSERT INTO orders (id, user_id, status, amount_cents) VALUES ($1, 'u1', 'CREATED', 1)`, id)
	}
	batch := []event.Event{
		ev(t, event.InventoryReserved, a), ev(t, event.OrderShipped, b), ev(t, event.PaymentCompleted, a),
		ev(t, event.InventoryReserved, b), ev(t, event.OrderCreated, a),
	}
	schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) { return s.Handle(ctx, tx, batch) })
	for id, want := range map[uuid.UUID]string{a: "PAID", b: "SHIPPED"} {
		var got string
		if err := pool.QueryRow(ctx, `SELECT status FROM orders WHERE id = $1`, id).Scan(&got); err != nil || got != want {
			t.Errorf("order %s: %s (%v), want %s", id, got, err, want)
		}
	}
	// The audit log keeps the batch's order.
	rows, err := pool.Query(ctx, `SELECT event_id FROM order_events ORDER BY seq`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil || len(got) != len(batch) {
		t.Fatalf("%d audit rows (%v), want %d", len(got), err, len(batch))
	}
	for i := range batch {
		if got[i] != batch[i].ID {
			t.Fatalf("audit row %d is %s, want %s", i, got[i], batch[i].ID)
		}
	}
}

// BenchmarkStatusBatch measures one polled batch of 100 events (25 orders
// through their whole lifecycle) through the status writer.
func BenchmarkStatusBatch(b *testing.B) {
	pool := schematest.NewPool(b)
	rdb, prefix := schematest.NewRedis(b)
	s := status.New(slog.New(slog.NewTextHandler(io.Discard, nil)), statuscache.New(rdb, prefix))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		var evs []event.Event
		for range 25 {
			id := uuid.New()
			if _, err := pool.Exec(ctx, `INSERT INTO orders (id, user_id, status, amount_cents) VALUES ($1, 'u', 'CREATED', 1)`, id); err != nil {
				b.Fatal(err)
			}
			for _, typ := range []event.Type{event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.OrderShipped} {
				e, _ := event.New(typ, id, "bench", map[string]string{})
				evs = append(evs, e)
			}
		}
		if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { _, err := s.Handle(ctx, tx, evs); return err }); err != nil {
			b.Fatal(err)
		}
		s.AfterCommit(ctx, evs)
	}
}
