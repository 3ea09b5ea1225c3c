package status_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/status"
	"github.com/prozess/prozess/schema/schematest"
)

// The sweeper expires exactly the orders short of payment whose owing
// participant received their event past the deadline, each once even with several sweepers at it, and only counts
// the paid ones.
func TestExpirerExpiresEachOverdueOrderOnce(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	ctx := context.Background()
	insert := func(st string, age time.Duration) uuid.UUID { return insertOrder(t, pool, st, age, age) }
	var overdue []uuid.UUID
	for range 30 {
		overdue = append(overdue, insert("CREATED", time.Hour), insert("INVENTORY_RESERVED", time.Hour))
	}
	young := insert("CREATED", time.Minute)
	paid := insert("PAID", time.Hour)
	done := insert("SHIPPED", time.Hour)

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	for range 4 { // four status processes sweeping at once
		wg.Go(func() {
			x := status.NewExpirer(log, pool, "order-events", 15*time.Minute, nil)
			for {
				n, paidOverdue, err := x.Sweep(ctx)
				if err != nil {
					t.Error(err)
					return
				}
				if paidOverdue != 1 {
					t.Errorf("%d paid orders past the deadline counted, want 1", paidOverdue)
				}
				mu.Lock()
				total += n
				mu.Unlock()
				if n == 0 {
					return
				}
			}
		})
	}
	wg.Wait()
	if total != len(overdue) {
		t.Fatalf("%d orders expired, want %d", total, len(overdue))
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM outbox`); n != int64(len(overdue)) {
		t.Fatalf("%d OrderExpired in the outbox, want %d", n, len(overdue))
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM orders WHERE expired_at IS NOT NULL AND id = ANY($1)`, overdue); n != int64(len(overdue)) {
		t.Fatalf("%d overdue orders stamped, want %d", n, len(overdue))
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM orders WHERE expired_at IS NOT NULL AND id = ANY($1)`, []uuid.UUID{young, paid, done}); n != 0 {
		t.Fatalf("%d orders expired that were young, paid or shipped", n)
	}
}

// insertOrder adds an order in status st created age ago and, when the
// status awaits a participant, the event it must answer, recorded by status
// and received by that participant received ago (never, when negative).
func insertOrder(t *testing.T, pool *pgxpool.Pool, st string, age, received time.Duration) uuid.UUID {
	t.Helper()
	id := uuid.New()
	schematest.Exec(t, pool, `INSERT INTO orders (id, user_id, status, amount_cents, created_at) VALUES ($1, 'u1', $2, 1, now() - make_interval(secs => $3))`,
		id, st, age.Seconds())
	awaited := map[string][2]string{"CREATED": {"OrderCreated", "inventory"}, "INVENTORY_RESERVED": {"InventoryReserved", "payment"}}[st]
	if awaited[0] == "" {
		return id
	}
	ev := uuid.New()
	schematest.Exec(t, pool, `INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload) VALUES ($1, $2, $3, 'test', now(), '{}')`,
		ev, id, awaited[0])
	if received >= 0 {
		schematest.Exec(t, pool, `INSERT INTO inbox (consumer, event_id, processed_at) VALUES ($1, $2, now() - make_interval(secs => $3))`,
			awaited[1], ev, received.Seconds())
	}
	return id
}

func expiredOnes(t *testing.T, pool *pgxpool.Pool, ids ...uuid.UUID) int64 {
	t.Helper()
	return schematest.Int(t, pool, `SELECT count(*) FROM orders WHERE expired_at IS NOT NULL AND id = ANY($1)`, ids)
}

// The deadline judges the participant that owes the next step, not the
// backlog: an order however old expires only deadline after that
// participant received its event (or dead-lettered, or the relay parked, a
// record of it); one whose event has not reached it waits.
func TestExpiryCountsFromTheOwingParticipant(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	x := status.NewExpirer(log, pool, "order-events", time.Minute, nil)

	waiting := []uuid.UUID{
		insertOrder(t, pool, "CREATED", time.Hour, -1),                        // inventory down or behind
		insertOrder(t, pool, "INVENTORY_RESERVED", time.Hour, -1),             // payment down or behind
		insertOrder(t, pool, "CREATED", time.Hour, 10*time.Second),            // inventory just got it
		insertOrder(t, pool, "INVENTORY_RESERVED", time.Hour, 10*time.Second), // payment just got it
	}
	held := []uuid.UUID{
		insertOrder(t, pool, "CREATED", time.Hour, 2*time.Minute),
		insertOrder(t, pool, "INVENTORY_RESERVED", time.Hour, 2*time.Minute),
	}
	deadLettered := insertOrder(t, pool, "CREATED", time.Hour, -1)
	schematest.Exec(t, pool, `INSERT INTO dead_letters (order_id, participant, reason, event_type, topic, partition, "offset", header_bytes, dead_at)
		VALUES ($1, 'inventory', 'undecodable', '', 'order-events', 0, 7, '', now() - interval '2 minutes')`, deadLettered)
	parked := insertOrder(t, pool, "CREATED", time.Hour, -1)
	schematest.Exec(t, pool, `INSERT INTO parked (id, topic, key, headers, created_at, error, parked_at)
		VALUES (1, 'order-events', convert_to($1::text, 'UTF8'), '[]', now() - interval '1 hour', 'MESSAGE_TOO_LARGE', now() - interval '2 minutes')`, parked)

	n, _, err := x.Sweep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := append(held, deadLettered, parked)
	if n != len(want) || expiredOnes(t, pool, want...) != int64(len(want)) {
		t.Fatalf("%d expired, want exactly the %d held past the deadline by their participant", n, len(want))
	}
	if got := expiredOnes(t, pool, waiting...); got != 0 {
		t.Fatalf("%d orders expired that had not reached their participant or only just", got)
	}
}

// While the outbox is behind (the relay down or slow), nothing expires, nor
// for grace (deadline/10, at least a second) after it caught up: the answer
// that moves an order on may be waiting there.
func TestExpiryPausesWhileTheOutboxIsBehind(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	x := status.NewExpirer(log, pool, "order-events", 2*time.Second, nil) // grace 1s
	id := insertOrder(t, pool, "CREATED", time.Hour, time.Hour)
	schematest.Exec(t, pool, `INSERT INTO outbox (topic, key, value, created_at) VALUES ('order-events', 'k', 'v', now() - interval '5 seconds')`)
	if n, _, err := x.Sweep(ctx); err != nil || n != 0 {
		t.Fatalf("expired %d (%v) with the outbox 5s behind, want 0", n, err)
	}
	schematest.Exec(t, pool, `DELETE FROM outbox`)
	if n, _, err := x.Sweep(ctx); err != nil || n != 0 {
		t.Fatalf("expired %d (%v) right after the outbox caught up, want 0", n, err)
	}
	time.Sleep(1200 * time.Millisecond)
	if n, _, err := x.Sweep(ctx); err != nil || n != 1 || expiredOnes(t, pool, id) != 1 {
		t.Fatalf("expired %d (%v) a grace after the outbox caught up, want 1", n, err)
	}
}

// An expiry whose order has not ended is sent again, with its first event
// id and a replay header, after the deadline, then twice as long each
// time; an order that ended is left alone.
func TestExpiryIsSentAgainUntilTheOrderEnds(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	x := status.NewExpirer(log, pool, "order-events", time.Minute, nil)
	stuck := insertOrder(t, pool, "INVENTORY_RESERVED", time.Hour, time.Hour)
	ended := insertOrder(t, pool, "INVENTORY_RESERVED", time.Hour, time.Hour)
	if n, _, err := x.Sweep(ctx); err != nil || n != 2 {
		t.Fatalf("expired %d (%v), want 2", n, err)
	}
	first := schematest.Int(t, pool, `SELECT count(*) FROM outbox`)
	schematest.Exec(t, pool, `DELETE FROM outbox`) // the relay published them
	schematest.Exec(t, pool, `UPDATE orders SET status = 'CANCELLED' WHERE id = $1`, ended)
	sweep := func() {
		t.Helper()
		if _, _, err := x.Sweep(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sweep()
	if n := schematest.Int(t, pool, `SELECT count(*) FROM outbox`); first != 2 || n != 0 {
		t.Fatalf("%d sent at once, %d more before the deadline; want 2 and 0", first, n)
	}
	// One deadline after the first send: sent again, same id, marked a replay.
	schematest.Exec(t, pool, `UPDATE orders SET expiry_sent_at = now() - interval '61 seconds'`)
	sweep()
	type sent struct {
		key, id string
		replay  bool
	}
	var got []sent
	rows, err := pool.Query(ctx, `SELECT convert_from(key, 'UTF8'), header_bytes FROM outbox ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var key string
		var hb []byte
		if err := rows.Scan(&key, &hb); err != nil {
			t.Fatal(err)
		}
		hs, err := event.DecodeHeaders(hb)
		if err != nil {
			t.Fatal(err)
		}
		s := sent{key: key}
		for _, h := range hs {
			switch h.Key {
			case "ce_id":
				s.id = string(h.Value)
			case deadletter.HeaderReplayOf:
				s.replay = true
			}
		}
		got = append(got, s)
	}
	var firstID string
	if err := pool.QueryRow(ctx, `SELECT expiry_event_id::text FROM orders WHERE id = $1`, stuck).Scan(&firstID); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].key != stuck.String() || got[0].id != firstID || !got[0].replay {
		t.Fatalf("sent again %+v, want only the stuck order's, id %s, as a replay", got, firstID)
	}
	// The second wait is two deadlines: 61 s is not enough, 121 s is.
	schematest.Exec(t, pool, `DELETE FROM outbox`)
	schematest.Exec(t, pool, `UPDATE orders SET expiry_sent_at = now() - interval '61 seconds'`)
	sweep()
	if n := schematest.Int(t, pool, `SELECT count(*) FROM outbox`); n != 0 {
		t.Fatalf("sent a third time one deadline after the second")
	}
	schematest.Exec(t, pool, `UPDATE orders SET expiry_sent_at = now() - interval '121 seconds'`)
	sweep()
	if n := schematest.Int(t, pool, `SELECT count(*) FROM outbox`); n != 1 {
		t.Fatalf("%d sent two deadlines after the second, want 1", n)
	}
	if n := schematest.Int(t, pool, `SELECT expiry_sends FROM orders WHERE id = $1`, stuck); n != 3 {
		t.Fatalf("expiry_sends %d, want 3", n)
	}
}

// An expiry stamped by a release before the re-sends (expired_at only, no
// expiry_event_id) is sent again with the id status recorded for it, so
// the trail keeps one OrderExpired; with none recorded, with a new id.
func TestExpiryOfAnOlderReleaseIsSentAgainWithItsID(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	x := status.NewExpirer(log, pool, "order-events", time.Minute, nil)
	recorded := insertOrder(t, pool, "INVENTORY_RESERVED", time.Hour, time.Hour)
	unrecorded := insertOrder(t, pool, "CREATED", time.Hour, time.Hour)
	schematest.Exec(t, pool, `UPDATE orders SET expired_at = now() - interval '2 minutes' WHERE id = ANY($1)`, []uuid.UUID{recorded, unrecorded})
	first := uuid.New()
	schematest.Exec(t, pool, `INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload) VALUES ($1, $2, 'OrderExpired', 'status', now(), '{}')`,
		first, recorded)
	if n, _, err := x.Sweep(ctx); err != nil || n != 0 {
		t.Fatalf("expired %d (%v) again, want 0: they are expired already", n, err)
	}
	ids := map[uuid.UUID]string{}
	rows, err := pool.Query(ctx, `SELECT id, expiry_event_id::text FROM orders WHERE expiry_sends = 2`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id uuid.UUID
		var ev string
		if err := rows.Scan(&id, &ev); err != nil {
			t.Fatal(err)
		}
		ids[id] = ev
	}
	if len(ids) != 2 || ids[recorded] != first.String() || ids[unrecorded] == "" || ids[unrecorded] == first.String() {
		t.Fatalf("sent again as %v, want %s for the recorded one and a new id for the other", ids, first)
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM outbox`); n != 2 {
		t.Fatalf("%d records in the outbox, want 2", n)
	}
}
