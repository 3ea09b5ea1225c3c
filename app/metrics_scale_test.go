package app_test

import (
	"context"
	"encoding/json"
	"fmt"
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

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/schema/schematest"
)

// queryLog records every SQL statement a pool runs (a pgx tracer), so a
// test sees what the code really asked PostgreSQL, not a list kept beside
// it.
type queryLog struct {
	mu      sync.Mutex
	queries []loggedQuery
}

type loggedQuery struct {
	sql  string
	args []any
}

func (l *queryLog) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.queries = append(l.queries, loggedQuery{d.SQL, d.Args})
	return ctx
}

func (l *queryLog) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// tracedPool is a pool on url whose every statement goes to the log.
func tracedPool(t *testing.T, url string) (*pgxpool.Pool, *queryLog) {
	t.Helper()
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
	return pool, log
}

// wholeReads EXPLAIN ANALYZEs every query the log saw, with its
// arguments, on db (they are all reads), and describes each that reads one
// of tables whole: a Seq Scan of it at any depth of its plan, or more pages
// touched (shared buffers, hit or read) than a quarter of the tables' size,
// which a full index scan would.
func (l *queryLog) wholeReads(t *testing.T, db *pgxpool.Pool, tables ...string) []string {
	t.Helper()
	l.mu.Lock()
	queries := slices.Clone(l.queries)
	l.mu.Unlock()
	var pages int64
	for _, tbl := range tables {
		pages += schematest.Int(t, db, `SELECT pg_relation_size($1::regclass) / current_setting('block_size')::int8`, tbl)
	}
	var found []string
	for _, q := range queries {
		var raw []byte
		if err := db.QueryRow(t.Context(), "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "+q.sql, q.args...).Scan(&raw); err != nil {
			t.Fatalf("EXPLAIN %s: %v", q.sql, err)
		}
		var plan []map[string]any
		if err := json.Unmarshal(raw, &plan); err != nil || len(plan) != 1 {
			t.Fatalf("EXPLAIN %s: %v %s", q.sql, err, raw)
		}
		top := plan[0]["Plan"].(map[string]any)
		touched := int64(top["Shared Hit Blocks"].(float64) + top["Shared Read Blocks"].(float64))
		t.Logf("%d of %d pages: %s", touched, pages, strings.Join(strings.Fields(q.sql), " "))
		if touched > pages/4 {
			found = append(found, fmt.Sprintf("%d pages of %s's %d (more than a quarter) in:\n%s\nplan: %s", touched, tables, pages, q.sql, raw))
		}
		for _, rel := range seqScans(plan[0]) {
			if slices.Contains(tables, rel) {
				found = append(found, fmt.Sprintf("%s (Seq Scan) in:\n%s\nplan: %s", rel, q.sql, raw))
			}
		}
	}
	return found
}

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

const shipped, cancelled = 60000, 3000

// largeDatabase is a database as a system that has run a while leaves it:
// 63,000 finished orders a day old or more and their audit trail, 20,000 replayed
// dead letters; 65 orders in flight from the last minute (30 CREATED, 20
// INVENTORY_RESERVED, the 10 youngest of them expired, 15 PAID, older), 7
// open dead letters; analysed as autovacuum would. Big enough that
// PostgreSQL reads a table whole only where a query leaves it no other way.
func largeDatabase(t *testing.T) (string, *pgxpool.Pool) {
	t.Helper()
	url := schematest.NewDatabase(t)
	plain, err := pgxpool.New(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(plain.Close)
	for _, sql := range []string{
		// Order ids as the api makes them: UUIDv7, whose first 48 bits are
		// the creation's Unix milliseconds.
		`CREATE FUNCTION order_id(at timestamptz) RETURNS uuid LANGUAGE sql AS $$
		 SELECT encode(overlay(uuid_send(gen_random_uuid())
		        PLACING substring(int8send(floor(extract(epoch FROM at) * 1000)::int8) FROM 3) FROM 1 FOR 6), 'hex')::uuid $$`,
		`INSERT INTO orders (id, user_id, status, amount_cents, created_at)
		 SELECT order_id(ts), 'u' || (i % 500), CASE WHEN i % 21 = 0 THEN 'CANCELLED' ELSE 'SHIPPED' END, 100, ts
		 FROM generate_series(1, 63000) i, LATERAL (SELECT now() - interval '1 day' - make_interval(secs => i) AS ts) x`,
		`INSERT INTO orders (id, user_id, status, amount_cents, created_at)
		 SELECT order_id(now() - make_interval(secs => i)), 'u1', s, 100, now() - make_interval(secs => i)
		 FROM generate_series(1, 65) i, LATERAL (SELECT CASE WHEN i <= 30 THEN 'CREATED' WHEN i <= 50 THEN 'INVENTORY_RESERVED' ELSE 'PAID' END s) x`,
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
	return url, plain
}

// The state /metrics reads every few seconds in every process costs what is
// in flight, never what has accumulated: on largeDatabase no query a scrape
// runs reads orders, order_events or dead_letters by a sequential scan
// (EXPLAIN of every statement the pool saw), and the gauges still say what
// is there: the unfinished statuses and the open dead letters exactly, the
// finished statuses within 10%.
func TestScrapeQueriesScanNoGrowingTable(t *testing.T) {
	t.Parallel()
	url, plain := largeDatabase(t)
	pool, log := tracedPool(t, url)
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

	if n := len(log.queries); n < 5 {
		t.Fatalf("the scrape ran %d queries, want the orders, outbox, parked, dead letters and unpaid-age reads", n)
	}
	for _, s := range log.wholeReads(t, plain, "orders", "order_events", "dead_letters") {
		t.Errorf("a scrape query reads all of %s", s)
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
	release := holdPayment(t, &cfg)
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

// holdPayment makes cfg's payment consumer wait inside its transaction,
// before the commit, until release is called (or the test ends), so its
// group's lag grows.
func holdPayment(t *testing.T, cfg *app.Config) (release func()) {
	hold := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(hold) }) }
	t.Cleanup(release)
	cfg.Fault = func(participant, point string) error {
		if participant == "payment" && point == saga.FaultBeforeCommit {
			<-hold
		}
		return nil
	}
	return release
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
