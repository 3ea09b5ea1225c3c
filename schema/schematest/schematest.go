// Package schematest gives each test its own PostgreSQL database, migrated
// with the real schema and dropped when the test ends, and its own Redis key
// prefix, cleaned up likewise, so tests run in parallel and leave nothing
// behind. It talks to real servers (those PROZESS_TEST_DATABASE_URL and
// PROZESS_TEST_REDIS_ADDR name, or a PostgreSQL server and an in-process Redis
// of the test binary's own): a test that cannot reach one fails with a
// message saying which and where; it never skips.
package schematest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/prozess/prozess/app/embedded"
	"github.com/prozess/prozess/schema"
)

// servers are the PostgreSQL and Redis of this test binary.
var servers struct {
	inMain    bool // Main is running the tests
	once      sync.Once
	adminURL  string
	redisAddr string
	err       error
	stop      []func()
}

// Main runs a package's tests against the servers they need and returns the
// exit code; call it from TestMain: os.Exit(schematest.Main(m)). With
// PROZESS_TEST_DATABASE_URL and PROZESS_TEST_REDIS_ADDR set, tests use those
// servers; without, the first test that needs one starts, for this test
// binary alone, a real PostgreSQL server (the machine's installation, or
// binaries fetched once, as `prozess serve all` does) in a temporary
// directory and an in-process Redis, and Main stops both and removes the
// directory when the tests end.
func Main(m *testing.M) int {
	servers.inMain = true
	code := m.Run()
	for i := len(servers.stop) - 1; i >= 0; i-- {
		servers.stop[i]()
	}
	return code
}

// start resolves the servers once: the PROZESS_TEST_ variables, or embedded
// ones.
func start() {
	servers.adminURL = os.Getenv("PROZESS_TEST_DATABASE_URL")
	servers.redisAddr = os.Getenv("PROZESS_TEST_REDIS_ADDR")
	if (servers.adminURL == "" || servers.redisAddr == "") && !servers.inMain {
		servers.err = errors.New("this package's TestMain must call schematest.Main (or set PROZESS_TEST_DATABASE_URL and PROZESS_TEST_REDIS_ADDR)")
		return
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if servers.adminURL == "" {
		dir, err := os.MkdirTemp("", "prozess-test-pg-")
		if err != nil {
			servers.err = err
			return
		}
		servers.stop = append(servers.stop, func() { os.RemoveAll(dir) })
		if err := os.Chmod(dir, 0o755); err != nil { // the server may run as another user
			servers.err = err
			return
		}
		port, err := freePort()
		if err != nil {
			servers.err = err
			return
		}
		pg, err := embedded.StartPostgres(context.Background(), filepath.Join(dir, "data"), port, "", log)
		if err != nil {
			servers.err = fmt.Errorf("starting the tests' embedded PostgreSQL (or set PROZESS_TEST_DATABASE_URL): %w", err)
			return
		}
		servers.stop = append(servers.stop, func() { _ = pg.Stop() })
		servers.adminURL = pg.URL("postgres")
	}
	if servers.redisAddr == "" {
		r, err := embedded.StartRedis("127.0.0.1:0", log)
		if err != nil {
			servers.err = err
			return
		}
		servers.stop = append(servers.stop, r.Close)
		servers.redisAddr = r.Addr()
	}
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func ready(t testing.TB) {
	t.Helper()
	servers.once.Do(start)
	if servers.err != nil {
		t.Fatalf("test servers: %v", servers.err)
	}
}

// AdminURL is the server tests create their databases on:
// PROZESS_TEST_DATABASE_URL, or this test binary's embedded server.
func AdminURL(t testing.TB) string {
	t.Helper()
	ready(t)
	return servers.adminURL
}

// RedisAddr is the Redis tests use: PROZESS_TEST_REDIS_ADDR, or this test
// binary's in-process one.
func RedisAddr(t testing.TB) string {
	t.Helper()
	ready(t)
	return servers.redisAddr
}

// Name returns a fresh name for a test's resources.
func Name(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// NewDatabase creates an empty database, migrated, and returns its URL. It
// is dropped (with any connections still open) when the test ends.
func NewDatabase(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, AdminURL(t))
	if err != nil {
		t.Fatalf("cannot reach PostgreSQL at %s (set PROZESS_TEST_DATABASE_URL): %v", AdminURL(t), err)
	}
	defer admin.Close(ctx)
	name := Name("prozess_test_")
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("creating test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, AdminURL(t))
		if err != nil {
			t.Errorf("dropping test database %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("dropping test database %s: %v", name, err)
		}
	})
	cfg, err := pgx.ParseConfig(AdminURL(t))
	if err != nil {
		t.Fatalf("PROZESS_TEST_DATABASE_URL: %v", err)
	}
	cfg.Database = name
	url := fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, name)
	if cfg.Password != "" {
		url = fmt.Sprintf("postgres://%s:%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Password, cfg.Host, cfg.Port, name)
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatalf("connecting to test database: %v", err)
	}
	defer pool.Close()
	if _, err := schema.Migrate(ctx, pool); err != nil {
		t.Fatalf("migrating test database: %v", err)
	}
	return url
}

// NewPool creates a migrated test database and returns a pool on it, closed
// before the database is dropped.
func NewPool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	url := NewDatabase(t)
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatalf("test database URL: %v", err)
	}
	schema.ConfigurePool(cfg) // as the binary's pools are (app.OpenDB)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatalf("connecting to test database: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// NewRedis returns a Redis client and a key prefix of the test's own; keys
// under the prefix are deleted when the test ends.
func NewRedis(t testing.TB) (rueidis.Client, string) {
	t.Helper()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{RedisAddr(t)}, DisableCache: true, ForceSingleClient: true})
	if err != nil {
		t.Fatalf("cannot reach Redis at %s (set PROZESS_TEST_REDIS_ADDR): %v", RedisAddr(t), err)
	}
	prefix := Name("prozesstest:") + ":"
	t.Cleanup(func() {
		defer rdb.Close()
		ctx := context.Background()
		var cursor uint64
		for {
			e, err := rdb.Do(ctx, rdb.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
			if err != nil {
				t.Errorf("cleaning Redis keys %s*: %v", prefix, err)
				return
			}
			if len(e.Elements) > 0 {
				rdb.Do(ctx, rdb.B().Del().Key(e.Elements...).Build())
			}
			if cursor = e.Cursor; cursor == 0 {
				return
			}
		}
	})
	return rdb, prefix
}

// InTx runs fn in a transaction on pool and commits it, failing the test on
// any error: how participant tests apply one event as the consumer would.
func InTx[T any](t testing.TB, pool *pgxpool.Pool, fn func(tx pgx.Tx) (T, error)) T {
	t.Helper()
	ctx := context.Background()
	var out T
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var err error
		out, err = fn(tx)
		return err
	})
	if err != nil {
		t.Fatalf("transaction: %v", err)
	}
	return out
}

// Exec runs one statement, failing the test on error.
func Exec(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// Int returns the single integer a query yields.
func Int(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// RedisServer starts a redis-server of the test's own on a free port of
// 127.0.0.1, given to portFlag (--port; or --tls-port, with "--port", "0"
// among args), saving nothing, with args added, and stops it when the test
// ends (continuing it first: a stopped process ignores the kill until it
// runs). Tests that hang, secure or stop a Redis use it, never the
// machine's. It returns the address once the server listens, and the
// process.
func RedisServer(t testing.TB, portFlag string, args ...string) (string, *exec.Cmd) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal("redis-server not found (apt-get install redis-server; .ci/services does)")
	}
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(bin, append([]string{portFlag, port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", t.TempDir()}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr, cmd
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server did not listen on %s within 10s:\n%s", addr, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
