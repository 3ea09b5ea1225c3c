package api

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Querier is what key management and the read functions need of a pool,
// a connection or a transaction.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Key is an API key as listed: never its secret.
type Key struct {
	ID        string     `json:"id"`
	UserID    string     `json:"user_id"`
	Admin     bool       `json:"admin"`
	CreatedAt time.Time  `json:"created_at"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
}

// Principal is who a request acts as.
type Principal struct {
	KeyID  string
	UserID string
	Admin  bool
}

// keyPrefix starts every key, so a leaked one is easy to recognise (and to
// scan for in code).
const keyPrefix = "pz_"

func hashKey(key string) []byte {
	sum := sha256.Sum256([]byte(key))
	return sum[:]
}

// CreateKey makes a new key for user and returns its id and the key itself,
// which is shown once and stored only as a hash.
func CreateKey(ctx context.Context, q Querier, user string, admin bool) (id, key string, err error) {
	if !userIDPattern.MatchString(user) {
		return "", "", fmt.Errorf("--user %q: must be 1 to 64 characters of letters, digits and ._@:-", user)
	}
	b := make([]byte, 4+32)
	if _, err := rand.Read(b); err != nil {
		return "", "", fmt.Errorf("generating key: %w", err)
	}
	id = "k" + hex.EncodeToString(b[:4])
	key = keyPrefix + id + "_" + hex.EncodeToString(b[4:])
	return id, key, insertKey(ctx, q, id, user, admin, key)
}

// EnsureKey stores a known key (the demo key, a load generator's) if its id
// is not there yet.
func EnsureKey(ctx context.Context, q Querier, id, user string, admin bool, key string) error {
	return insertKey(ctx, q, id, user, admin, key)
}

func insertKey(ctx context.Context, q Querier, id, user string, admin bool, key string) error {
	_, err := q.Exec(ctx, `INSERT INTO api_keys (id, user_id, admin, hash) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING`,
		id, user, admin, hashKey(key))
	if err != nil {
		return fmt.Errorf("storing API key: %w", err)
	}
	return nil
}

// ListKeys lists every key, newest first.
func ListKeys(ctx context.Context, q Querier) ([]Key, error) {
	rows, err := q.Query(ctx, `SELECT id, user_id, admin, created_at, revoked_at FROM api_keys ORDER BY created_at DESC, id`)
	if err != nil {
		return nil, fmt.Errorf("listing API keys: %w", err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowToStructByPos[Key])
	if err != nil {
		return nil, fmt.Errorf("listing API keys: %w", err)
	}
	return keys, nil
}

// ErrNoKey is returned for revoking a key that does not exist.
var ErrNoKey = errors.New("no such API key")

// RevokeKey stops a key from working, at once: the notification, sent when
// the update commits, makes every api process drop the key from its cache.
func RevokeKey(ctx context.Context, q Querier, id string) error {
	tag, err := q.Exec(ctx, `
		WITH k AS (UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING id)
		SELECT pg_notify('`+keysChannel+`', id) FROM k`, id)
	if err != nil {
		return fmt.Errorf("revoking API key: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: %s", ErrNoKey, id)
	}
	return nil
}

// validKey reports whether key looks like one of ours at all; anything
// else is refused without a lookup.
func validKey(key string) bool { return strings.HasPrefix(key, keyPrefix) && len(key) <= 200 }

// lookupKey returns who the key with hash h acts as, and false for an
// unknown or revoked key.
func lookupKey(ctx context.Context, q Querier, h []byte) (Principal, bool, error) {
	var p Principal
	err := q.QueryRow(ctx, `SELECT id, user_id, admin FROM api_keys WHERE hash = $1 AND revoked_at IS NULL`, h).
		Scan(&p.KeyID, &p.UserID, &p.Admin)
	if errors.Is(err, pgx.ErrNoRows) {
		return Principal{}, false, nil
	}
	if err != nil {
		return Principal{}, false, fmt.Errorf("looking up API key: %w", err)
	}
	return p, true, nil
}
