package app_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

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
