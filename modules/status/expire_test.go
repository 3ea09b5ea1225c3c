package status_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/prozess/prozess/modules/status"
	"github.com/prozess/prozess/schema/schematest"
)

// The sweeper expires exactly the orders short of payment past the
// deadline, each once even with several sweepers at it, and only counts
// the paid ones.
func TestExpirerExpiresEachOverdueOrderOnce(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	ctx := context.Background()
	insert := func(st string, age time.Duration) uuid.UUID {
		id := uuid.New()
		schematest.Exec(t, pool, `INSERT INTO orders (id, user_id, status, amount_cents, created_at) VALUES ($1, 'u1', $2, 1, now() - make_interval(secs => $3))`,
			id, st, age.Seconds())
		return id
	}
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
