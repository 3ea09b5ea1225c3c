package app_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/embedded"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
	"github.com/prozess/prozess/schema/schematest"
)

// sharingRedis is a second deployment: a database of its own, the same
// Redis and the same --redis-prefix as e.
func sharingRedis(e *env) *env {
	t := e.t
	url := schematest.NewDatabase(t)
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return &env{t: t, dbURL: url, prefix: e.prefix, dataDir: t.TempDir(), pool: pool, keys: map[string]string{}}
}

// status GETs an order with the demo key (user u1 in every deployment).
func status(t *testing.T, r *running, id string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, r.url+"/orders/"+id, nil)
	req.Header.Set("Authorization", "Bearer pz_kdemo_0000000000000000000000000000000000000000000000000000000000000000")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	return res.StatusCode
}

// Two deployments with their own databases share one Redis and one key
// prefix (a staging and a production, say). The same user with the same
// Idempotency-Key gets an order of its own in each, and neither answers for
// the other's order. Before, the second POST was answered 201 with the first
// deployment's order id from Redis, and nothing was created.
func TestTwoDatabasesSharingARedisNeverSeeEachOther(t *testing.T) {
	e := newEnv(t)
	other := sharingRedis(e)
	r1 := e.start(e.config())
	r2 := other.start(other.config())
	a := r1.order(t, "u1", "checkout-1", mouse(1)).OrderID.String()
	b := r2.order(t, "u1", "checkout-1", mouse(1)).OrderID.String()
	if a == b {
		t.Fatalf("both deployments answered order %s: the second from the first's cache", a)
	}
	if n := other.count(`SELECT count(*) FROM orders WHERE id = $1`, b); n != 1 {
		t.Fatalf("order %s is not in the second deployment's database", b)
	}
	if got := r1.await(t, a, 20*time.Second); !got.Status.Terminal() {
		t.Fatal(got.Status)
	}
	if got := r2.await(t, b, 20*time.Second); !got.Status.Terminal() {
		t.Fatal(got.Status)
	}
	// Neither answers for the other's order, from its database or from
	// the Redis they share (the second read would come from a cache).
	for i := range 3 {
		if code := status(t, r2, a); code != http.StatusNotFound {
			t.Fatalf("read %d of the first deployment's order from the second: %d, want 404", i, code)
		}
		if code := status(t, r1, b); code != http.StatusNotFound {
			t.Fatalf("read %d of the second deployment's order from the first: %d, want 404", i, code)
		}
	}
	// And the same key again in each gives back each one's own order.
	if again := r2.order(t, "u1", "checkout-1", mouse(1)).OrderID.String(); again != b {
		t.Fatalf("second deployment replayed %s, want its own %s", again, b)
	}
}

// source GETs an order as its owner u1 and returns it with where it came
// from (X-Prozess-Source).
func source(t *testing.T, r *running, id string) (api.Order, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, r.url+"/orders/"+id, nil)
	req.Header.Set("Authorization", "Bearer "+r.e.keyFor("u1"))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var o api.Order
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		t.Fatalf("GET /orders/%s: %d %s", id, res.StatusCode, b)
	}
	if err := json.NewDecoder(res.Body).Decode(&o); err != nil {
		t.Fatal(err)
	}
	return o, res.Header.Get("X-Prozess-Source")
}

// An order whose terminal status is cached gets a dead letter from a
// process without Redis (inventory alone, which cannot hold the entry),
// and another gets a parked record (the relay does not hold entries
// either): GET /orders/{id} shows each the moment PostgreSQL has it.
// Before, both answered from the cache, without them, for the entry's
// 24 h.
func TestDeadLetterFromAProcessWithoutRedisIsShownAtOnce(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "payment", "delivery", "status")
	e.start(cfg, "inventory") // no Redis: only api and status open it
	dead := r.order(t, "u1", "", mouse(1)).OrderID
	park := r.order(t, "u1", "", mouse(1)).OrderID
	for _, id := range []uuid.UUID{dead, park} {
		r.await(t, id.String(), 30*time.Second)
		if o, src := source(t, r, id.String()); src != "cache" || !o.Status.Terminal() {
			t.Fatalf("order %s before: %s from %q, want terminal from the cache", id, o.Status, src)
		}
	}

	// The dead letter: the first order's OrderCreated again with a new
	// event id, which inventory's reservation refuses (23505).
	ev, err := event.New(event.OrderCreated, dead, "api", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.KafkaBrokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), ev.Record(cfg.Topic)).FirstErr(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); e.count(`SELECT count(*) FROM dead_letters WHERE order_id = $1`, dead) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("inventory dead-lettered nothing within 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if o, src := source(t, r, dead.String()); len(o.DeadLetters) != 1 || o.DeadLetters[0].Participant != "inventory" {
		t.Fatalf("GET right after inventory dead-lettered a record of %s: dead letters %+v, from %q", dead, o.DeadLetters, src)
	}

	// The parked record, as the relay parks one.
	schematest.Exec(t, e.pool, `INSERT INTO parked (id, topic, key, value, headers, created_at, error)
		VALUES (1, $1, $2, '{}', '[["ce_type","PaymentCompleted"],["ce_source","/prozess/payment"]]', now(), 'MESSAGE_TOO_LARGE')`,
		cfg.Topic, []byte(park.String()))
	if o, src := source(t, r, park.String()); len(o.Parked) != 1 {
		t.Fatalf("GET right after a record of %s was parked: parked %+v, from %q", park, o.Parked, src)
	}
}

// A clone of the database (CREATE DATABASE ... TEMPLATE, as a dump and
// restore would make it: the same deployment id, the same orders) served
// with the same Redis and the same --redis-prefix does not answer from the
// original's cache entries: its first read of an order comes from its own
// PostgreSQL. Before, keys were bound to the deployment id alone, which a
// clone or a point-in-time restore keeps, and the clone answered from the
// original's entries.
func TestClonedDatabaseDoesNotAnswerFromTheOriginalsCache(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	id := r.order(t, "u1", "before-clone", mouse(1)).OrderID.String()
	r.await(t, id, 30*time.Second)
	if _, src := source(t, r, id); src != "cache" {
		t.Fatalf("the original answered from %q, want its cache", src)
	}
	if err := r.shutdown(t); err != nil {
		t.Fatal(err)
	}

	ctx := t.Context()
	admin, err := pgx.Connect(ctx, schematest.AdminURL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	cc, err := pgx.ParseConfig(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	orig, clone := cc.Database, schematest.Name("prozess_test_clone_")
	e.pool.Reset() // a template may have no other sessions
	if _, err := admin.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, orig); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+clone+" TEMPLATE "+orig); err != nil {
		t.Fatalf("cloning %s: %v", orig, err)
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), schematest.AdminURL(t))
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close(context.Background())
		if _, err := c.Exec(context.Background(), "DROP DATABASE IF EXISTS "+clone+" WITH (FORCE)"); err != nil {
			t.Error(err)
		}
	})
	url := strings.Replace(e.dbURL, "/"+orig+"?", "/"+clone+"?", 1)
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	c := &env{t: t, dbURL: url, prefix: e.prefix, dataDir: t.TempDir(), pool: pool, keys: e.keys} // the keys are cloned too
	if a, b := bound(t, e), bound(t, c); a == b {
		t.Errorf("the clone's keys are bound like the original's: %s", a)
	}
	cr := c.start(c.config())
	if o, src := source(t, cr, id); src != "database" || o.OrderID.String() != id {
		t.Fatalf("the clone's first read of %s: %s from %q, want it from its own database", id, o.OrderID, src)
	}
}

// The copy's identity is readable by a role that is not a superuser, and
// where an administrator revoked the control functions (as some managed
// services do), the server's start time stands in for them, so binding
// still works. On an embedded PostgreSQL of the test's own: the revoke
// would change the shared server for everyone.
func TestDatabaseIdentityWithoutControlFunctions(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx := t.Context()
	pg, err := embedded.StartPostgres(ctx, filepath.Join(reachableTempDir(t), "pg"), addr, t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Stop() })
	identity := func(user string) string {
		t.Helper()
		url := strings.Replace(pg.URL("postgres"), "postgres://postgres", "postgres://"+user, 1)
		conn, err := pgx.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		id, err := statuscache.Identity(ctx, conn)
		if err != nil {
			t.Fatalf("identity as %s: %v", user, err)
		}
		return id
	}
	full := identity("postgres")
	if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(full) {
		t.Fatalf("identity %q, want system.timeline.oid", full)
	}
	conn, err := pgx.Connect(ctx, pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// The embedded server asks every login for a password: the reader gets
	// the superuser's, which the URLs above carry.
	u, err := url.Parse(pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	pass, _ := u.User.Password()
	if _, err := conn.Exec(ctx, `CREATE ROLE reader LOGIN PASSWORD '`+pass+`'`); err != nil {
		t.Fatal(err)
	}
	if got := identity("reader"); got != full {
		t.Fatalf("a plain role reads identity %q, the superuser %q", got, full)
	}
	if _, err := conn.Exec(ctx, `REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC`); err != nil {
		t.Fatal(err)
	}
	oid := full[strings.LastIndex(full, "."):]
	if got := identity("reader"); !regexp.MustCompile(`^start-\d+\.\d+$`).MatchString(got) || !strings.HasSuffix(got, oid) {
		t.Fatalf("identity without pg_control_system: %q, want start-<server start>%s", got, oid)
	}
}
