package app_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prozess/prozess/app/embedded"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// ownRedis starts a plain redis-server of the test's own on a free port
// (never the machine's: the test hangs it) and returns its address and
// process.
func ownRedis(t *testing.T) (string, *exec.Cmd) {
	t.Helper()
	return schematest.RedisServer(t, "--port")
}

// timed is one request's answer and how long it took.
type timed struct {
	what       string
	code       int
	source     string
	retryAfter string
	body       []byte
	took       time.Duration
}

func (r *running) timedDo(t *testing.T, method, path, user, key string, body []byte) timed {
	t.Helper()
	req, _ := http.NewRequest(method, r.url+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+r.e.keyFor(user))
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	start := time.Now()
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	what := method + " " + path
	if key != "" {
		what += " (Idempotency-Key)"
	}
	if err != nil { // code 0: no answer (the caller may be a goroutine: no Fatal)
		return timed{what: what, body: []byte(err.Error()), took: time.Since(start)}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return timed{what: what, code: resp.StatusCode, source: resp.Header.Get("X-Prozess-Source"), retryAfter: resp.Header.Get("Retry-After"),
		body: b, took: time.Since(start)}
}

// With Redis hung (SIGSTOPped: its connections open, nothing answering),
// POST, with and without an Idempotency-Key, and GET answer within the
// Redis bound plus PostgreSQL, 0.5 s each, every time, with PostgreSQL's
// answers; when Redis resumes nothing is lost, a key sent during the hang
// replays its order, and the cache answers nothing PostgreSQL contradicts.
// Before, 29 of 30 requests took longer than 0.5 s, the slowest 2.0 s.
func TestHungRedisCostsEachRequestAtMostItsBound(t *testing.T) {
	e := newEnv(t)
	addr, redis := ownRedis(t)
	cfg := e.config()
	cfg.RedisAddr = addr
	r := e.start(cfg)

	// Orders whose entries are cached before the hang.
	var ids []string
	for i := range 3 {
		ids = append(ids, r.order(t, "u1", fmt.Sprintf("before-%d", i), mouse(1)).OrderID.String())
	}
	for _, id := range ids {
		r.await(t, id, 30*time.Second)
		if got := r.timedDo(t, http.MethodGet, "/orders/"+id, "u1", "", nil); got.code != http.StatusOK || got.source != "cache" {
			t.Fatalf("GET %s before the hang: %d from %q, want 200 from the cache", id, got.code, got.source)
		}
	}

	if err := redis.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			redis.Process.Signal(syscall.SIGCONT)
		}
	}()
	body, _ := json.Marshal(api.CreateRequest{UserID: "u1", Items: []event.Item{mouse(1)}})
	var all []timed
	keyed := map[string]string{} // Idempotency-Key -> order id
	for i := range 30 {
		var got timed
		switch i % 4 {
		case 0:
			got = r.timedDo(t, http.MethodPost, "/orders", "u1", "", body)
		case 1:
			key := fmt.Sprintf("during-%d", i)
			got = r.timedDo(t, http.MethodPost, "/orders", "u1", key, body)
			var res api.CreateResponse
			json.Unmarshal(got.body, &res)
			keyed[key] = res.OrderID.String()
		case 2:
			// A key sent before the hang: PostgreSQL replays it.
			got = r.timedDo(t, http.MethodPost, "/orders", "u1", fmt.Sprintf("before-%d", i%3), body)
			var res api.CreateResponse
			json.Unmarshal(got.body, &res)
			if res.OrderID.String() != ids[i%3] {
				t.Errorf("replay of before-%d during the hang answered %s, want %s", i%3, res.OrderID, ids[i%3])
			}
		case 3:
			got = r.timedDo(t, http.MethodGet, "/orders/"+ids[i%3], "u1", "", nil)
			var o api.Order
			json.Unmarshal(got.body, &o)
			var truth string
			e.pool.QueryRow(t.Context(), `SELECT status FROM orders WHERE id = $1`, ids[i%3]).Scan(&truth)
			if got.code != http.StatusOK || string(o.Status) != truth {
				t.Errorf("GET during the hang: %d %s, want 200 with PostgreSQL's %s", got.code, got.body, truth)
			}
		}
		if got.code != http.StatusOK && got.code != http.StatusCreated {
			t.Errorf("%s during the hang: %d %s", got.what, got.code, got.body)
		}
		if got.code == http.StatusCreated && i%4 != 2 {
			var res api.CreateResponse
			json.Unmarshal(got.body, &res)
			ids = append(ids, res.OrderID.String())
		}
		all = append(all, got)
	}
	var slow []string
	var worst time.Duration
	for _, got := range all {
		worst = max(worst, got.took)
		if got.took > 500*time.Millisecond {
			slow = append(slow, fmt.Sprintf("%s %s", got.what, got.took.Round(time.Millisecond)))
		}
	}
	t.Logf("Redis hung: %d requests, %d over 0.5s, slowest %s", len(all), len(slow), worst.Round(time.Millisecond))
	if len(slow) > 0 {
		t.Errorf("with Redis hung, %d of %d requests took longer than 0.5s: %s", len(slow), len(all), strings.Join(slow, ", "))
	}

	if err := redis.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped = false
	// Nothing lost: every order accepted during the hang finishes, a key
	// sent during the hang replays its order, and every read agrees with
	// PostgreSQL, from the cache or not.
	for _, id := range ids {
		r.await(t, id, 60*time.Second)
	}
	for key, id := range keyed {
		if again := r.order(t, "u1", key, mouse(1)).OrderID.String(); again != id {
			t.Errorf("Idempotency-Key %s after the hang answered %s, want %s", key, again, id)
		}
	}
	if n := e.count(`SELECT count(*) FROM orders`); n != int64(len(ids)) {
		t.Errorf("%d orders in PostgreSQL, want the %d accepted", n, len(ids))
	}
	e.awaitQuiet(30 * time.Second)
	// The cache comes back: a read is answered from it again.
	back := time.Now()
	for r.timedDo(t, http.MethodGet, "/orders/"+ids[0], "u1", "", nil).source != "cache" {
		if time.Since(back) > 20*time.Second {
			t.Fatal("no read came from the cache within 20s of Redis resuming")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("reads from the cache again %s after the orders settled", time.Since(back).Round(time.Millisecond))
	sources := map[string]int{}
	for range 2 {
		for _, id := range ids {
			got := r.timedDo(t, http.MethodGet, "/orders/"+id, "u1", "", nil)
			var o api.Order
			json.Unmarshal(got.body, &o)
			var truth string
			e.pool.QueryRow(t.Context(), `SELECT status FROM orders WHERE id = $1`, id).Scan(&truth)
			if string(o.Status) != truth {
				t.Errorf("GET %s after the hang: %s from %s, PostgreSQL says %s", id, o.Status, got.source, truth)
			}
			sources[got.source]++
		}
	}
	if sources["cache"] == 0 {
		t.Errorf("no read came from the cache after Redis resumed: %v", sources)
	}
	out, err := runCLI(t, "check", "--database-url", e.dbURL, "--redis-addr", addr, "--redis-prefix", e.prefix,
		"--kafka-brokers", strings.Join(r.sys.Brokers(), ","), "--log-level", "warn")
	if err != nil || strings.Contains(out, "FAIL") {
		t.Fatalf("prozess check after the hang: %v\n%s", err, out)
	}
}

// embeddedPostgres starts a PostgreSQL server of the test's own (never the
// machine's: the test hangs it) and returns its URL for database name and
// the postmaster's pid.
func embeddedPostgres(t *testing.T, name string) (string, int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := filepath.Join(reachableTempDir(t), "pg")
	pg, err := embedded.StartPostgres(t.Context(), dir, addr, t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Stop() })
	b, err := os.ReadFile(filepath.Join(dir, "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	if err != nil {
		t.Fatalf("postmaster.pid: %v", err)
	}
	return pg.URL(name), pid
}

// signalServer sends sig to a PostgreSQL server: the postmaster first (no
// new backends), then each of its children, which run in sessions of
// their own, so a signal to the postmaster's group misses them.
func signalServer(t *testing.T, postmaster int, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(postmaster, sig); err != nil {
		t.Fatal(err)
	}
	for _, pid := range childrenOf(postmaster) {
		syscall.Kill(pid, sig)
	}
}

// outcome is what one POST with an Idempotency-Key got.
type outcome struct {
	key  string
	code int
	id   string
	took time.Duration
}

// PostgreSQL frozen (every server process SIGSTOPped: connections open,
// nothing answering) while orders are being written: requests answer
// within a bound instead of waiting for it, and when it resumes nothing
// accepted is lost or doubled: every key retried after the hang has one
// order, every order finishes, prozess check is clean.
func TestHungPostgresMidTransaction(t *testing.T) {
	t.Parallel()
	url, postmaster := embeddedPostgres(t, "prozess")
	e := envOn(t, url) // its pool connects once the system created the database
	r := e.start(e.config())
	initial := r.stock(t)
	known := r.order(t, "u1", "known", mouse(1)).OrderID.String()
	r.await(t, known, 30*time.Second)

	body, _ := json.Marshal(api.CreateRequest{UserID: "u1", Items: []event.Item{mouse(1)}})
	var mu sync.Mutex
	var outcomes []outcome
	halt := clients(6, func(w, i int) {
		key := fmt.Sprintf("w%d-%d", w, i)
		got := r.timedDo(t, http.MethodPost, "/orders", "u1", key, body)
		var res api.CreateResponse
		json.Unmarshal(got.body, &res)
		mu.Lock()
		outcomes = append(outcomes, outcome{key: key, code: got.code, id: res.OrderID.String(), took: got.took})
		mu.Unlock()
	})
	time.Sleep(time.Second)
	signalServer(t, postmaster, syscall.SIGSTOP)
	hung := time.Now()
	stopped := true
	defer func() {
		if stopped {
			signalServer(t, postmaster, syscall.SIGCONT)
		}
	}()
	var reads []timed
	for time.Since(hung) < 8*time.Second {
		reads = append(reads, r.timedDo(t, http.MethodGet, "/orders/"+known, "u1", "", nil))
	}
	signalServer(t, postmaster, syscall.SIGCONT)
	stopped = false
	halt()
	// Every request answered within the database bound (5 s) and a
	// margin: accepted, or 503 to be retried.
	const bound = 8 * time.Second
	var worst time.Duration
	for _, g := range reads {
		worst = max(worst, g.took)
		if g.took > bound || g.code != http.StatusOK && g.code != http.StatusServiceUnavailable {
			t.Errorf("GET during the hang: %d %s after %s, want 200 or 503 within %s", g.code, g.body, g.took.Round(time.Millisecond), bound)
		}
	}
	var failed []outcome
	for _, o := range outcomes {
		worst = max(worst, o.took)
		if o.code != http.StatusCreated {
			failed = append(failed, o)
		}
		if o.took > bound || o.code != http.StatusCreated && o.code != http.StatusServiceUnavailable {
			t.Errorf("POST %s during the hang: %d after %s, want 201 or 503 within %s", o.key, o.code, o.took.Round(time.Millisecond), bound)
		}
	}
	t.Logf("PostgreSQL hung 8s: %d GETs, %d POSTs (%d not accepted), slowest answer %s",
		len(reads), len(outcomes), len(failed), worst.Round(time.Millisecond))
	// Nothing lost or doubled: a key that was not answered is retried,
	// and every key has exactly one order.
	for _, o := range failed {
		r.order(t, "u1", o.key, mouse(1))
	}
	for _, o := range outcomes {
		if n := e.count(`SELECT count(*) FROM orders WHERE user_id = 'u1' AND idempotency_key = $1`, o.key); n != 1 {
			t.Errorf("key %s has %d orders", o.key, n)
		}
	}
	e.awaitQuiet(60 * time.Second)
	e.assertExactlyOnce(initial, r.stock(t))
}

// clients runs n clients, each calling do with its number and a count of
// its calls, one call after another, until the returned halt is called;
// halt waits for the calls under way and may be called more than once.
func clients(n int, do func(w, i int)) (halt func()) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				do(w, i)
			}
		}()
	}
	return sync.OnceFunc(func() { close(stop); wg.Wait() })
}
