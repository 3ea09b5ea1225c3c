package app_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/schema/schematest"
)

// idAt is an order id as the api makes them (UUIDv7) for an order created
// at t.
func idAt(t *testing.T, at time.Time) uuid.UUID {
	t.Helper()
	id, err := uuid.NewV7()
	if err != nil {
		t.Fatal(err)
	}
	ms := at.UnixMilli()
	for i := range 6 {
		id[i] = byte(ms >> (8 * (5 - i)))
	}
	return id
}

// check --since reads only the window's orders: a violation older than the
// window is not reported, a newer one is, through the API and the command
// (a duration or an RFC 3339 time); without --since both are. A bad value
// fails naming the flag, exit 2, before any server is reached.
func TestCheckSinceBoundsTheWindow(t *testing.T) {
	e := newEnv(t)
	now := time.Now()
	old, recent := idAt(t, now.Add(-3*time.Hour)), idAt(t, now.Add(-10*time.Minute))
	for id, age := range map[uuid.UUID]string{old: "3 hours", recent: "10 minutes"} {
		// Stuck in INVENTORY_RESERVED, with an audit trail that is no
		// lifecycle path: two rules broken per order.
		schematest.Exec(t, e.pool, `INSERT INTO orders (id, user_id, status, amount_cents, created_at)
			VALUES ($1, 'u1', 'INVENTORY_RESERVED', 1, now() - $2::interval)`, id, age)
		schematest.Exec(t, e.pool, `INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload)
			VALUES (gen_random_uuid(), $1, 'OrderShipped', 'delivery', now(), '{}')`, id)
	}
	subjects := func(rep *check.Report, rule string) []string {
		var out []string
		for _, v := range rep.Violations {
			if v.Rule == rule {
				out = append(out, v.Subject)
			}
		}
		return out
	}
	for _, c := range []struct {
		since time.Time
		want  []uuid.UUID
	}{
		{now.Add(-time.Hour), []uuid.UUID{recent}},
		{time.Time{}, []uuid.UUID{old, recent}},
	} {
		rep, err := check.Run(t.Context(), e.pool, check.Config{Deadline: time.Minute, Since: c.since})
		if err != nil {
			t.Fatal(err)
		}
		for _, rule := range []string{check.RuleStuck, check.RuleTrail} {
			got := subjects(rep, rule)
			if len(got) != len(c.want) {
				t.Errorf("since %v: %s violations %v, want %v", c.since, rule, got, c.want)
				continue
			}
			for _, id := range c.want {
				if !strings.Contains(strings.Join(got, " "), id.String()) {
					t.Errorf("since %v: %s violations %v, want %s among them", c.since, rule, got, id)
				}
			}
		}
		if rep.Orders != int64(len(c.want)) {
			t.Errorf("since %v: %d orders counted, want %d", c.since, rep.Orders, len(c.want))
		}
	}

	brokers := strings.Join(e.broker(), ",")
	for _, since := range []string{"1h", now.Add(-time.Hour).UTC().Format(time.RFC3339)} {
		out, err := runCLI(t, "check", "--database-url", e.dbURL, "--kafka-brokers", brokers, "--no-cache", "--json", "--since", since, "--log-level", "warn")
		if err == nil || !strings.Contains(err.Error(), "violations") {
			t.Fatalf("check --since %s: %v, want violations\n%s", since, err, out)
		}
		var rep check.Report
		if err := json.Unmarshal([]byte(out[:strings.LastIndex(out, "}")+1]), &rep); err != nil {
			t.Fatalf("check --since %s --json: %v\n%s", since, err, out)
		}
		if strings.Contains(out, old.String()) || !strings.Contains(out, recent.String()) || rep.Since == nil {
			t.Errorf("check --since %s reported (want %s, not %s):\n%s", since, recent, old, out)
		}
	}
	for _, bad := range []string{"yesterday", "-1h", "2026-13-01"} {
		out, err := runCLI(t, "check", "--database-url", e.dbURL, "--kafka-brokers", brokers, "--since", bad)
		if err == nil || !strings.Contains(err.Error(), "--since") {
			t.Errorf("check --since %s: %v, want an error naming --since\n%s", bad, err, out)
		}
		// PostgreSQL is not even asked: the value is checked first.
		if code := app.Main([]string{"check", "--database-url", "postgres://postgres@127.0.0.1:1/prozess?connect_timeout=2", "--since", bad}); code != 2 {
			t.Errorf("check --since %s exits %d, want 2", bad, code)
		}
	}
}

// On largeDatabase, check --since an hour reads the window's orders and
// their audit trail through indexes: no rule's query reads order_events
// whole, nor orders but for stock conservation, a sum over every order.
func TestCheckSinceReadsNoWholeAuditTrail(t *testing.T) {
	t.Parallel()
	url, plain := largeDatabase(t)
	schematest.Exec(t, plain, `INSERT INTO products (id, name, price_cents, stock, received) VALUES ('p', 'p', 1, 0, 0)`)
	pool, log := tracedPool(t, url)
	if _, err := check.Run(t.Context(), pool, check.Config{Deadline: time.Minute, Since: time.Now().Add(-time.Hour)}); err != nil {
		t.Fatal(err)
	}
	for _, s := range log.wholeReads(t, plain, "orders", "order_events") {
		if strings.Contains(s, "FROM products p") {
			continue // stock conservation: every order by design
		}
		t.Errorf("check --since reads all of %s", s)
	}
}
