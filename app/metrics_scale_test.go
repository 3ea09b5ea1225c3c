package app_test

import (
	"context"
	"encoding/json"
	"math"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/schema/schematest"
)

// queryLog records every SQL statement a pool runs (a pgx tracer), so a
// test sees what a scrape really asked PostgreSQL, not a list kept beside
// the code.
type queryLog struct {
	mu  sync.Mutex
	sql []string
}

func (l *queryLog) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(d.Args) == 0 && !slices.Contains(l.sql, d.SQL) {
		l.sql = append(l.sql, d.SQL)
	} else if len(d.Args) > 0 {
		l.sql = append(l.sql, "-- has arguments: "+d.SQL)
	}
	return ctx
}

func (l *queryLog) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// seqScans returns the relations of a plan (EXPLAIN (FORMAT JSON)) read by
// a sequential scan, at any depth.
func seqScans(node map[string]any) []string {
	var out []string
	if node["Node Type"] == "Seq Scan" {
		out = append(out, node["Relation Name"].(string))
	}
	for _, child := range []string{"Plan", "Plans"} {
		switch c := node[child].(type) {
		case map[string]any:
			out = append(out, seqScans(c)...)
		case []any:
			for _, p := range c {
				out = append(out, seqScans(p.(map[string]any))...)
			}
		}
	}
	return out
}

// The state /metrics reads every few seconds in every process costs what is
// in flight, never what has accumulated: on a database with 60,000 finished
// orders, their audit trail and 20,000 replayed dead letters, analysed as
// autovacuum would, no query a scrape runs reads orders, order_events or
// dead_letters by a sequential scan (EXPLAIN of every statement the pool saw),
// and the gauges still say what is there: the unfinished statuses and the
// open dead letters exactly, the finished statuses within a few percent.
func TestScrapeQueriesScanNoGrowingTable(t *testing.T) {
	t.Parallel()
	url := schematest.NewDatabase(t)
	plain, err := pgxpool.New(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(plain.Close)
	const shipped, cancelled = 60000, 3000
	for _, sql := range []string{
		`INSERT INTO orders (id, user_id, status, amount_cents, created_at)
		 SELECT gen_random_uuid(), 'u' || (i % 500), CASE WHEN i % 21 = 0 THEN 'CANCELLED' ELSE 'SHIPPED' END, 100, now() - interval '1 day'
		 FROM generate_series(1, 63000) i`,
		`INSERT INTO orders (id, user_id, status, amount_cents, created_at)
		 SELECT gen_random_uuid(), 'u1', s, 100, now() - make_interval(secs => i)
		 FROM generate_series(1, 65) i, LATERAL (SELECT CASE WHEN i <= 30 THEN 'CREATED' WHEN i <= 50 THEN 'INVENTORY_RESERVED' ELSE 'PAID' END s) x`,
		// The ten youngest reserved ones expired (the other partial index):
		// the oldest unexpired unpaid order is 50 s old, the paid ones older.
		`UPDATE orders SET expired_at = now() WHERE id IN (SELECT id FROM orders WHERE status = 'INVENTORY_RESERVED' ORDER BY created_at DESC LIMIT 10)`,
		`INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload)
		 SELECT gen_random_uuid(), id, 'OrderShipped', 'delivery', now(), '{}' FROM orders`,
		`INSERT INTO dead_letters (participant, reason, event_type, topic, partition, "offset", header_bytes, replayed_at)
		 SELECT 'payment', 'bad', 'x', 'order-events', 0, i, '', CASE WHEN i > 7 THEN now() END FROM generate_series(1, 20000) i`,
		`VACUUM ANALYZE orders, order_events, dead_letters`,
	} {
		schematest.Exec(t, plain, sql)
	}
	if n := schematest.Int(t, plain, `SELECT count(*) FROM orders WHERE status = 'CANCELLED'`); n != cancelled {
		t.Fatalf("seeded %d cancelled orders, want %d", n, cancelled)
	}

	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	log := &queryLog{}
	cfg.ConnConfig.Tracer = log
	pool, err := pgxpool.NewWithConfig(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	metrics := telemetry.NewMetrics()
	metrics.Register(telemetry.NewStateCollector(pool, nil, nil))
	srv := httptest.NewServer(metrics.Handler())
	t.Cleanup(srv.Close)
	text := scrape(t, srv.URL)
	got := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) == 2 && strings.HasPrefix(line, "prozess_") {
			v, _ := strconv.ParseFloat(f[1], 64)
			got[f[0]] = v
		}
	}
	exact := map[string]float64{
		`prozess_orders{status="CREATED"}`:            30,
		`prozess_orders{status="INVENTORY_RESERVED"}`: 20,
		`prozess_orders{status="PAID"}`:               15,
		`prozess_dead_letters_open`:                   7,
		`prozess_outbox_rows`:                         0,
		`prozess_relay_parked_records`:                0,
	}
	for k, want := range exact {
		if v, ok := got[k]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want exactly %v", k, v, ok, want)
		}
	}
	for k, want := range map[string]float64{`prozess_orders{status="SHIPPED"}`: shipped, `prozess_orders{status="CANCELLED"}`: cancelled} {
		if v, ok := got[k]; !ok || math.Abs(v-want) > want*0.1 {
			t.Errorf("%s = %v (present %v), want the estimate within 10%% of %v", k, v, ok, want)
		}
	}
	if age := got["prozess_saga_oldest_unpaid_age_seconds"]; age < 50 || age >= 60 {
		t.Errorf("prozess_saga_oldest_unpaid_age_seconds = %v, want the oldest unexpired unpaid order's 50 s", age)
	}

	log.mu.Lock()
	queries := slices.Clone(log.sql)
	log.mu.Unlock()
	if len(queries) < 4 {
		t.Fatalf("the scrape ran %d queries, want the orders, outbox, parked, dead letters and unpaid-age reads: %q", len(queries), queries)
	}
	growing := []string{"orders", "order_events", "dead_letters"}
	for _, q := range queries {
		if strings.HasPrefix(q, "-- has arguments") {
			t.Errorf("a scrape query has arguments; this test EXPLAINs only constant ones: %s", q)
			continue
		}
		var plan []map[string]any
		var raw []byte
		if err := plain.QueryRow(t.Context(), "EXPLAIN (FORMAT JSON) "+q).Scan(&raw); err != nil {
			t.Fatalf("EXPLAIN %s: %v", q, err)
		}
		if err := json.Unmarshal(raw, &plan); err != nil || len(plan) != 1 {
			t.Fatalf("EXPLAIN %s: %v %s", q, err, raw)
		}
		for _, rel := range seqScans(plan[0]) {
			if slices.Contains(growing, rel) {
				t.Errorf("a scrape query reads all of %s (Seq Scan):\n%s\nplan: %s", rel, q, raw)
			}
		}
	}
}

// Lag per partition shows which partition a consumer group is behind on:
// with payment held inside its transaction and one order reserved, the
// partition the order's key hashes to lags and the topic's other
// partitions do not; the per-partition series add up to the summed one,
// and once payment goes on every partition is back to 0.
func TestConsumerPartitionLag(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	hold := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(hold) }) }
	t.Cleanup(release)
	cfg.Fault = func(participant, point string) error {
		if participant == "payment" && point == saga.FaultBeforeCommit {
			<-hold
		}
		return nil
	}
	r := e.start(cfg)
	admin := "http://" + r.sys.AdminAddr() + "/metrics"
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	part := recordPartition(t, r.sys.Brokers(), cfg.Topic, id)
	group := cfg.GroupPrefix + "payment"
	series := func(p int) string {
		return `prozess_consumer_partition_lag_records{group="` + group + `",participant="payment",partition="` + strconv.Itoa(p) +
			`",topic="` + cfg.Topic + `"}`
	}
	var m string
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		m = scrape(t, admin)
		if v, ok := metricSample(m, series(part)); ok && v >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("payment's lag on partition %d never reached 1 with payment held:\n%s", part, grepLines(m, "prozess_consumer_partition_lag_records"))
		}
	}
	sum := 0.0
	for p := range int(cfg.Partitions) {
		v := mustValue(t, m, series(p))
		if p != part && v != 0 {
			t.Errorf("partition %d lags %v; only partition %d holds the order's events", p, v, part)
		}
		sum += v
	}
	if total := mustValue(t, m, `prozess_consumer_lag_records{participant="payment"}`); total != sum {
		t.Errorf("per-partition lag adds up to %v, the summed gauge says %v", sum, total)
	}
	release()
	r.await(t, id, 15*time.Second)
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		m = scrape(t, admin)
		if mustValue(t, m, series(part)) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("partition %d still lags after payment caught up:\n%s", part, grepLines(m, "prozess_consumer_partition_lag_records"))
		}
	}
}

// recordPartition reads the topic from the start until it finds a record keyed
// by key, and returns its partition.
func recordPartition(t *testing.T, brokers []string, topic, key string) int {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	for {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("no record keyed %s on %s", key, topic)
		}
		for _, rec := range fs.Records() {
			if string(rec.Key) == key {
				return int(rec.Partition)
			}
		}
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
