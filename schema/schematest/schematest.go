// Package schematest gives each test its own PostgreSQL database, migrated
// with the real schema and dropped when the test ends, and its own Redis key
// prefix, cleaned up likewise, so tests run in parallel and leave nothing
// behind. It talks to real servers: a test that cannot reach one fails with
// a message saying which and where; it never skips.
package schematest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/prozess/prozess/schema"
)

// AdminURL is the server tests create their databases on:
// PROZESS_TEST_DATABASE_URL, or the local default.
func AdminURL() string {
	if u := os.Getenv("PROZESS_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

// RedisAddr is the Redis tests use: PROZESS_TEST_REDIS_ADDR, or the local default.
func RedisAddr() string {
	if a := os.Getenv("PROZESS_TEST_REDIS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:6379"
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
	admin, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		t.Fatalf("cannot reach PostgreSQL at %s (set PROZESS_TEST_DATABASE_URL): %v", AdminURL(), err)
	}
	defer admin.Close(ctx)
	name := Name("prozess_test_")
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("creating test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, AdminURL())
		if err != nil {
			t.Errorf("dropping test database %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("dropping test database %s: %v", name, err)
		}
	})
	cfg, err := pgx.ParseConfig(AdminURL())
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
	pool, err := pgxpool.New(context.Background(), url)
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
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{RedisAddr()}, DisableCache: true})
	if err != nil {
		t.Fatalf("cannot reach Redis at %s (set PROZESS_TEST_REDIS_ADDR): %v", RedisAddr(), err)
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
