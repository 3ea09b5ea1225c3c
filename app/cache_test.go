package app_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
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
