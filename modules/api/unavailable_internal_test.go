package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/schema/schematest"
)

// Each error databaseDown sorts is made by a real PostgreSQL (or a real
// refused connection), not written by hand: what pgx returns is what the
// api meets. A database that did not take the request is a 503 with
// nothing done; a connection that broke under way, a 503 that may have
// taken effect; a misconfiguration, a bug, a client gone, a 500 as before.
func TestDatabaseDownSortsRealErrors(t *testing.T) {
	t.Parallel()
	url := schematest.NewDatabase(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	connect := func(t *testing.T, url string) *pgx.Conn {
		t.Helper()
		conn, err := pgx.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		return conn
	}
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()

	cases := []struct {
		name string
		err  func(t *testing.T) error
		want dbState
	}{
		{"no server listening", func(t *testing.T) error {
			_, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/x?sslmode=disable&connect_timeout=5", closed))
			return err
		}, dbRefused},
		{"read-only transaction (25006)", func(t *testing.T) error {
			conn := connect(t, url)
			if _, err := conn.Exec(ctx, `SET default_transaction_read_only = on`); err != nil {
				t.Fatal(err)
			}
			_, err := conn.Exec(ctx, `CREATE TABLE t (id int)`)
			return err
		}, dbRefused},
		{"pooled connection found closed", func(t *testing.T) error {
			conn, err := pgx.Connect(ctx, url)
			if err != nil {
				t.Fatal(err)
			}
			conn.Close(ctx)
			_, err = conn.Exec(ctx, `SELECT 1`)
			return err
		}, dbRefused},
		{"session ended by the server (57P01)", func(t *testing.T) error {
			conn := connect(t, url)
			_, err := conn.Exec(ctx, `SELECT pg_terminate_backend(pg_backend_pid())`)
			return err
		}, dbLost},
		{"no such database (3D000)", func(t *testing.T) error {
			c := cfg.Copy()
			c.Database = "prozess_no_such_database"
			_, err := pgx.ConnectConfig(ctx, c)
			return err
		}, dbUp},
		{"a bug: syntax error", func(t *testing.T) error {
			_, err := connect(t, url).Exec(ctx, `SELEC 1`)
			return err
		}, dbUp},
		{"client gone", func(t *testing.T) error {
			gone, stop := context.WithCancel(ctx)
			stop()
			_, err := connect(t, url).Exec(gone, `SELECT 1`)
			return err
		}, dbUp},
		{"an answer already made", func(t *testing.T) error {
			return fmt.Errorf("wrapped: %w", &Error{Status: http.StatusNotFound, Code: "not_found"})
		}, dbUp},
		{"not the database's", func(t *testing.T) error { return errors.New("something else") }, dbUp},
	}
	for _, c := range cases {
		err := c.err(t)
		if err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		if got := databaseDown(err); got != c.want {
			t.Errorf("%s: databaseDown(%v) = %d, want %d", c.name, err, got, c.want)
		}
	}
}
