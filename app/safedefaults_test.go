package app_test

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/app"
)

// dbURLNamed is the test database's URL with another database name.
func dbURLNamed(t *testing.T, base, name string) string {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

func databaseExists(t *testing.T, e *env, name string) bool {
	t.Helper()
	var n int
	if err := e.pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_database WHERE datname = $1`, name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// A command that only reads (or manages keys) never creates a database: a
// misspelt name fails with the flag named, and nothing is created.
func TestReadCommandsCreateNoDatabase(t *testing.T) {
	e := newEnv(t)
	name := "prozess_typo_" + strings.ReplaceAll(e.prefix, ":", "")
	missing := dbURLNamed(t, e.dbURL, name)
	t.Cleanup(func() { // only if the test failed: leave nothing behind
		_, _ = e.pool.Exec(context.Background(), "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	})
	brokers := strings.Join(e.broker(), ",")
	for _, args := range [][]string{
		{"dlq", "list", "--kafka-brokers", brokers, "--database-url", missing},
		{"apikey", "list", "--database-url", missing},
		{"apikey", "create", "--user", "x", "--database-url", missing},
		{"orders", "get", "01a2154b-12fe-7269-98f9-3dd93c718619", "--database-url", missing},
		{"check", "--no-cache", "--kafka-brokers", brokers, "--database-url", missing},
		{"migrate", "status", "--database-url", missing},
	} {
		out, err := runCLI(t, args...)
		if err == nil || !strings.Contains(err.Error(), "--database-url") || !strings.Contains(err.Error(), "no database") {
			t.Errorf("%v on a missing database: %v\n%s", args[:2], err, out)
		}
		if databaseExists(t, e, name) {
			t.Fatalf("%v created the database %s", args[:2], name)
		}
	}
}

// Migrating is the upgrade step's: a read command refuses an unmigrated
// database and changes nothing; migrate --dry-run lists and changes
// nothing; serve --migrate=false refuses to start; migrate applies it all.
func TestOnlyMigrateMigrates(t *testing.T) {
	e := newEnv(t)
	name := "prozess_empty_" + strings.ReplaceAll(e.prefix, ":", "")
	if _, err := e.pool.Exec(t.Context(), "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = e.pool.Exec(context.Background(), "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	})
	empty := dbURLNamed(t, e.dbURL, name)
	tables := func() int {
		conn, err := pgx.Connect(t.Context(), empty)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(t.Context())
		var n int
		if err := conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_tables WHERE schemaname = 'public'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for _, args := range [][]string{{"apikey", "list"}, {"orders", "get", "01a2154b-12fe-7269-98f9-3dd93c718619"}} {
		if out, err := runCLI(t, append(args, "--database-url", empty)...); err == nil || !strings.Contains(err.Error(), "run prozess migrate") {
			t.Errorf("%v on an unmigrated database: %v\n%s", args, err, out)
		}
	}
	out, err := runCLI(t, "migrate", "--dry-run", "--database-url", empty)
	if err != nil || !strings.Contains(out, "would apply 00001_") || !strings.Contains(out, "dry run: nothing changed") {
		t.Fatalf("migrate --dry-run: %v\n%s", err, out)
	}
	if n := tables(); n > 1 { // goose's version table at most
		t.Fatalf("after reads and a dry run the database has %d tables", n)
	}
	cfg := e.config()
	cfg.DatabaseURL, cfg.Migrate = empty, false
	if len(cfg.KafkaBrokers) == 0 {
		cfg.KafkaBrokers = e.broker()
	}
	if sys, err := app.NewSystem(t.Context(), cfg, []string{"payment"}, slog.New(slog.DiscardHandler)); err == nil {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		_ = sys.Run(ctx)
		t.Fatal("serve --migrate=false started on an unmigrated database")
	} else if !strings.Contains(err.Error(), "--migrate=false") {
		t.Fatalf("serve --migrate=false: %v", err)
	}
	if out, err := runCLI(t, "migrate", "--database-url", empty); err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	out, err = runCLI(t, "migrate", "status", "--database-url", empty)
	if err != nil || strings.Contains(out, "pending") || !strings.Contains(out, "applied") {
		t.Fatalf("migrate status after migrate: %v\n%s", err, out)
	}
	if out, err := runCLI(t, "apikey", "list", "--database-url", empty); err != nil {
		t.Fatalf("apikey list after migrate: %v\n%s", err, out)
	}
}

// An address given means a real deployment: serve never starts an
// embedded server beside it for one that is missing (a misspelt variable
// would put orders on a throwaway disk), and says which flag is missing.
func TestNoEmbeddedServerBesideAGivenAddress(t *testing.T) {
	e := newEnv(t)
	brokers := strings.Join(e.broker(), ",")
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "api", "--database-url", e.dbURL, "--kafka-brokers", brokers}, "--redis-addr not given"},
		{[]string{"serve", "all", "--database-url", e.dbURL}, "give --redis-addr, --kafka-brokers too, or pass --embedded"},
		{[]string{"serve", "all", "--database-url", e.dbURL, "--kafka-brokers", brokers}, "give --redis-addr too"},
	} {
		out, err := runCLI(t, append(c.args, "--data-dir", dir, "--http-addr", "127.0.0.1:0", "--admin-addr", "")...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v (want %q)\n%s", c.args, err, c.want, out)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) > 0 {
		t.Errorf("a refused serve left %d entries in its data directory (an embedded server started?)", len(entries))
	}
}

// statusOf is the HTTP status of GET url, or 0 when nothing answers.
func statusOf(url string) int {
	resp, err := http.Get(url)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// At shutdown /readyz fails first while the api still takes orders, for
// --drain-delay, so a load balancer stops sending before connections are
// refused; then the process stops.
func TestShutdownDrainsBeforeClosing(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.DrainDelay = 3 * time.Second
	r := e.start(cfg)
	ready := "http://" + r.sys.AdminAddr() + "/readyz"
	for end := time.Now().Add(20 * time.Second); statusOf(ready) != 200; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("/readyz not 200 within 20s")
		}
	}
	stopped := time.Now()
	r.stop()
	for statusOf(ready) != 503 {
		if time.Since(stopped) > time.Second {
			t.Fatalf("/readyz still %d a second after shutdown began", statusOf(ready))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := r.order(t, "u1", "", mouse(1)); got.Status != "CREATED" {
		t.Fatalf("an order while draining: %+v", got)
	}
	if err := r.wait(t, 30*time.Second); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if took := time.Since(stopped); took < cfg.DrainDelay {
		t.Fatalf("stopped %s after shutdown began, before the %s drain", took, cfg.DrainDelay)
	}
}

// badKeyFrom sends a wrong key as if from client (X-Forwarded-For) and
// returns the status.
func badKeyFrom(t *testing.T, base, client string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, base+"/orders/01a2154b-12fe-7269-98f9-3dd93c718619", nil)
	req.Header.Set("Authorization", "Bearer pz_knope_0000000000000000000000000000000000000000000000000000000000000000")
	req.Header.Set("X-Forwarded-For", client)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Behind a trusted proxy each client has its own failed-authentication
// budget (the address X-Forwarded-For names); from anywhere else the
// header is ignored, so a client cannot buy a fresh budget by writing it.
func TestTrustedProxiesGiveEachClientItsBudget(t *testing.T) {
	e := newEnv(t)
	brokers := e.broker()
	for _, c := range []struct {
		trusted   string
		secondGot int
	}{{"127.0.0.1/32", http.StatusUnauthorized}, {"", http.StatusTooManyRequests}} {
		cfg := e.config()
		cfg.AuthFailRate, cfg.AuthFailBurst = 0.001, 3
		cfg.KafkaBrokers = brokers
		if c.trusted != "" {
			_, n, _ := net.ParseCIDR(c.trusted)
			cfg.TrustedProxies = []*net.IPNet{n}
		}
		r := e.start(cfg, "api")
		got := []int{}
		for range 4 {
			got = append(got, badKeyFrom(t, r.url, "203.0.113.5"))
		}
		if got[3] != http.StatusTooManyRequests {
			t.Fatalf("trusted %q: client A's 4th wrong key got %v, want 429 last", c.trusted, got)
		}
		if second := badKeyFrom(t, r.url, "203.0.113.6"); second != c.secondGot {
			t.Errorf("trusted %q: client B's first wrong key got %d, want %d", c.trusted, second, c.secondGot)
		}
		r.shutdown(t)
	}
	if _, err := runCLI(t, "serve", "all", "--trusted-proxies", "10.0.0.0/33"); err == nil || !strings.Contains(err.Error(), "--trusted-proxies") {
		t.Errorf("a bad CIDR: %v", err)
	}
}
