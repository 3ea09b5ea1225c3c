package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/schema"
)

// OpenDB connects to PostgreSQL, creating the database first if it is
// missing (and saying so), so a fresh machine needs no manual step. Every
// connection gets statementTimeout (0: none), so no query can hang forever.
// Only the commands that set a database up (serve, migrate, seed) create
// it: for any other, a misspelt name must fail, not answer from a fresh,
// empty database (openExistingDB).
func OpenDB(ctx context.Context, url string, statementTimeout time.Duration, log *slog.Logger) (*pgxpool.Pool, error) {
	return openDB(ctx, url, statementTimeout, log, true)
}

// openExistingDB is OpenDB for a database that must exist already.
func openExistingDB(ctx context.Context, url string, statementTimeout time.Duration, log *slog.Logger) (*pgxpool.Pool, error) {
	return openDB(ctx, url, statementTimeout, log, false)
}

func openDB(ctx context.Context, url string, statementTimeout time.Duration, log *slog.Logger, create bool) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("--database-url: %w", err)
	}
	if statementTimeout > 0 {
		cfg.ConnConfig.RuntimeParams["statement_timeout"] = strconv.FormatInt(statementTimeout.Milliseconds(), 10)
	}
	// Every connection made from this config (the pool's, the relay's
	// lease, the api's LISTEN: they copy it) notices a dead host.
	cfg.ConnConfig.DialFunc = dbDialer().DialContext
	where := addrsOf(cfg.ConnConfig)
	if err := ensureDatabase(ctx, cfg.ConnConfig, log, create); err != nil {
		var missing *missingDatabase
		if errors.As(err, &missing) {
			return nil, fmt.Errorf("--database-url: PostgreSQL at %s has no database %q (this command creates none): "+
				"check the URL, or create it with prozess migrate", where, missing.name)
		}
		return nil, fmt.Errorf("cannot reach PostgreSQL at %s: %s", where, oneLine(err))
	}
	cfg.MaxConns = max(cfg.MaxConns, 16)
	schema.ConfigurePool(cfg)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("cannot reach PostgreSQL at %s: %s", where, oneLine(err))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("cannot reach PostgreSQL at %s: %s", where, oneLine(err))
	}
	return pool, nil
}

// addrsOf lists every server a URL names, for errors: a multi-host URL
// (a primary and its standbys) may fail on any of them, and naming only
// the first would send an operator to the wrong server.
func addrsOf(cc *pgx.ConnConfig) string {
	addrs := []string{fmt.Sprintf("%s:%d", cc.Host, cc.Port)}
	for _, f := range cc.Fallbacks { // pgx lists a host twice for sslmode=prefer
		if a := fmt.Sprintf("%s:%d", f.Host, f.Port); !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	return strings.Join(addrs, ",")
}

// missingDatabase is the database a command that creates none did not find.
type missingDatabase struct{ name string }

func (m *missingDatabase) Error() string { return "database " + m.name + " does not exist" }

func ensureDatabase(ctx context.Context, cc *pgx.ConnConfig, log *slog.Logger, create bool) error {
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err == nil {
		return conn.Close(ctx)
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "3D000" { // invalid_catalog_name
		return err
	}
	if !create {
		return &missingDatabase{name: cc.Database}
	}
	admin := cc.Copy()
	admin.Database = "postgres"
	conn, err = pgx.ConnectConfig(ctx, admin)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{cc.Database}.Sanitize())
	if err != nil && !errors.As(err, &pgErr) || err != nil && pgErr.Code != "42P04" { // duplicate_database: created by a racing process
		return fmt.Errorf("creating database %s: %w", cc.Database, err)
	}
	log.Info("created database", "database", cc.Database)
	return nil
}

// oneLine folds a multi-line error (pgx lists every address it tried) into
// the one line a start-up failure must be.
func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }
