package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// env is one test's world: its own database, Redis prefix and broker data
// directory. Systems started on it share them, so a test can crash one and
// start another on the same state.
type env struct {
	t       *testing.T
	dbURL   string
	prefix  string
	dataDir string
	pool    *pgxpool.Pool
	keysMu  sync.Mutex
	keys    map[string]string // user -> API key; "admin" is an admin key
	// kafka is the real cluster's topic and groups for this test when
	// PROZESS_TEST_KAFKA_BROKERS is set; nil means each system starts its
	// own kfake broker.
	kafka *sagatest.Kafka
}

// keyFor returns an API key acting as user, creating it on first use.
func (e *env) keyFor(user string) string {
	e.keysMu.Lock()
	defer e.keysMu.Unlock()
	if k, ok := e.keys[user]; ok {
		return k
	}
	_, k, err := api.CreateKey(context.Background(), e.pool, user, user == "admin")
	if err != nil {
		e.t.Fatalf("creating API key: %v", err)
	}
	e.keys[user] = k
	return k
}

func newEnv(t *testing.T) *env {
	t.Helper()
	t.Parallel()
	return envOf(t)
}

// newBrokerFaultEnv is newEnv for a test that kills or stops the shared
// Apache Kafka cluster's brokers: it has the cluster to itself
// (sagatest.Exclusive), so its faults are not every other test's.
func newBrokerFaultEnv(t *testing.T) *env {
	t.Helper()
	t.Parallel()
	sagatest.Exclusive(t)
	return envOf(t)
}

func envOf(t *testing.T) *env {
	t.Helper()
	e := envOn(t, schematest.NewDatabase(t))
	if sagatest.Real() {
		k := sagatest.New(t)
		e.kafka = &k
	}
	return e
}

// envOn is an env on the database url names (which may not exist yet: the
// pool connects when first used), with a Redis key prefix of its own and
// kfake brokers.
func envOn(t *testing.T, url string) *env {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	_, prefix := schematest.NewRedis(t)
	return &env{t: t, dbURL: url, prefix: prefix, dataDir: t.TempDir(), pool: pool, keys: map[string]string{}}
}

func (e *env) config() app.Config {
	cfg := app.DefaultConfig()
	cfg.DatabaseURL = e.dbURL
	cfg.RedisAddr = schematest.RedisAddr(e.t)
	cfg.RedisPrefix = e.prefix
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.AdminAddr = "127.0.0.1:0"
	cfg.BrokerAddr = "127.0.0.1:0"
	cfg.Embedded = true // the broker is the test's own kfake unless the test names one
	cfg.DataDir = e.dataDir
	cfg.Partitions = 3
	cfg.PaymentDeclineRate = 0
	cfg.RateLimit = 0 // tests poll hard; the limit has tests of its own
	if e.kafka != nil {
		cfg.KafkaBrokers, cfg.Topic, cfg.GroupPrefix = e.kafka.Brokers, e.kafka.Topic, e.kafka.GroupPrefix
	}
	return cfg
}

// broker starts a Kafka-protocol broker of the test's own, stopped when
// the test ends, for systems that must share one.
func (e *env) broker() []string {
	e.t.Helper()
	if e.kafka != nil {
		return e.kafka.Brokers
	}
	b, err := saga.StartBroker("127.0.0.1:0", e.t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(b.Close)
	return b.ListenAddrs()
}

// running is a started System.
type running struct {
	e    *env
	sys  *app.System
	url  string
	stop context.CancelFunc
	done chan error
}

// start runs a system for cfg until the test ends (or stop is called).
func (e *env) start(cfg app.Config, names ...string) *running {
	e.t.Helper()
	level := slog.LevelWarn
	if os.Getenv("PROZESS_TEST_LOG") != "" {
		level = slog.LevelDebug
	}
	return e.startLogged(cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})), names...)
}

// startLogged is start with the system logging to log.
func (e *env) startLogged(cfg app.Config, log *slog.Logger, names ...string) *running {
	e.t.Helper()
	if len(names) == 0 {
		names = app.Participants()
	}
	sys, err := app.NewSystem(context.Background(), cfg, names, log)
	if err != nil {
		e.t.Fatalf("starting system: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{e: e, sys: sys, url: "http://" + sys.HTTPAddr(), stop: cancel, done: make(chan error, 1)}
	go func() { r.done <- sys.Run(ctx) }()
	e.t.Cleanup(func() { r.shutdown(e.t) })
	return r
}

// wait waits for the system to stop by itself and returns its error.
func (r *running) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err
		return err
	case <-time.After(timeout):
		t.Fatalf("system still running after %s", timeout)
		return nil
	}
}

// shutdown stops the system and waits for it.
func (r *running) shutdown(t *testing.T) error {
	r.stop()
	return r.wait(t, 30*time.Second)
}

func (r *running) order(t *testing.T, user string, key string, items ...event.Item) api.CreateResponse {
	t.Helper()
	b, _ := json.Marshal(api.CreateRequest{UserID: user, Items: items})
	req, _ := http.NewRequest(http.MethodPost, r.url+"/orders", bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+r.e.keyFor(user))
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST /orders: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("POST /orders: %d %s", resp.StatusCode, body)
	}
	var out api.CreateResponse
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// getJSON reads url with the admin key, which may read every order.
func (r *running) getJSON(t *testing.T, path string, v any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, r.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+r.e.keyFor("admin"))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
}

// await polls GET /orders/{id} until the order is terminal and, when
// released is set, its stock release is in the audit trail.
func (r *running) await(t *testing.T, id string, timeout time.Duration) api.Order {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var o api.Order
		r.getJSON(t, "/orders/"+id, &o)
		if o.Status.Terminal() {
			return o
		}
		if time.Now().After(deadline) {
			t.Fatalf("order %s still %s after %s", id, o.Status, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// awaitStatus polls GET /orders/{id} until the order has reached want (or
// is terminal), and returns it; it fails the test after timeout.
func (r *running) awaitStatus(t *testing.T, id string, want event.Status, timeout time.Duration) api.Order {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var o api.Order
		r.getJSON(t, "/orders/"+id, &o)
		if o.Status.Rank() >= want.Rank() || o.Status.Terminal() {
			return o
		}
		if time.Now().After(deadline) {
			t.Errorf("order %s still %s after %s, want %s", id, o.Status, timeout, want)
			return o
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *running) trail(t *testing.T, id string) []event.Type {
	t.Helper()
	var types []event.Type
	var evs []api.AuditEvent
	r.getJSON(t, "/orders/"+id+"/events", &evs)
	for _, e := range evs {
		types = append(types, event.Type(e.Type))
	}
	return types
}

// awaitTrail waits until the audit trail is exactly want.
func (r *running) awaitTrail(t *testing.T, id string, want ...event.Type) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		got := r.trail(t, id)
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) || len(got) > len(want) {
			t.Fatalf("audit trail of %s is %v, want %v", id, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *running) stock(t *testing.T) map[string]int64 {
	t.Helper()
	m := map[string]int64{}
	var ps []api.Product
	r.getJSON(t, "/products", &ps)
	for _, p := range ps {
		m[p.ID] = p.Stock
	}
	return m
}

// insertOrder writes an order for one prod-mouse (u1, 29.99) as the api
// would, without its OrderCreated: for tests that publish that themselves.
func (e *env) insertOrder() uuid.UUID {
	id := uuid.New()
	schematest.Exec(e.t, e.pool, `INSERT INTO orders (id, user_id, status, amount_cents) VALUES ($1, 'u1', 'CREATED', 2999)`, id)
	schematest.Exec(e.t, e.pool, `INSERT INTO order_items (order_id, product_id, qty, price_cents) VALUES ($1, 'prod-mouse', 1, 2999)`, id)
	return id
}

func (e *env) count(sql string, args ...any) int64 {
	e.t.Helper()
	return schematest.Int(e.t, e.pool, sql, args...)
}

func mouse(qty int) event.Item { return event.Item{ProductID: "prod-mouse", Qty: qty} }
