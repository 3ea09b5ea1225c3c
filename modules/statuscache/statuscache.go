// Package statuscache is the Redis fast path for GET /orders/{id}, shared by
// the api (which fills it) and the status participant (which advances it).
//
// PostgreSQL stays the source of truth: every write here is forward-only
// along the lifecycle, done in one Lua script so that racing writers (a slow
// api fill and the status writer) can never move an entry backwards, and
// entries expire so a lost update heals by itself.
package statuscache

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/redis/rueidis"

	"github.com/prozess/prozess/modules/event"
)

// TTLs: a non-terminal entry can go stale if Redis drops one update, so it
// lives briefly; a terminal status never changes again.
const (
	liveTTL     = time.Minute
	terminalTTL = 24 * time.Hour
)

// upsert sets status only when the entry's rank is lower than the new one,
// and the doc (immutable) whenever it is given and missing. The status
// writer has no doc: for an order not cached yet it leaves a status-only
// entry, which reads as a miss but keeps a later, slower fill by the api
// (with an older status read before the saga advanced) from writing that
// older status: nothing writes an older status over a newer one, and no
// stale fill lands on a missing entry.
var upsert = rueidis.NewLuaScript(`
local cur = redis.call('HGET', KEYS[1], 'rank')
local changed = 0
if cur == false or tonumber(cur) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'rank', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  changed = 1
end
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[1], 'doc') == 0 then
  redis.call('HSET', KEYS[1], 'doc', ARGV[3])
  changed = 1
end
return changed
`)

// hold marks an entry as one readers must not be answered from: its order
// has a dead letter, which only PostgreSQL shows. The mark outlives status
// changes (a re-driven order still has its history there) and goes with the
// entry; an entry created by it alone is a miss that lives liveTTL.
var hold = rueidis.NewLuaScript(`
redis.call('HSET', KEYS[1], 'hold', '1')
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 1
`)

// Cache reads and writes order status entries under a key prefix, so several
// deployments (and parallel tests) can share one Redis.
// Every call goes through its Guard, so it returns by its context's
// deadline even with Redis hung.
type Cache struct {
	rdb    rueidis.Client
	prefix string
	guard  *Guard
}

// New returns a cache using rdb with keys under prefix (see BoundPrefix).
func New(rdb rueidis.Client, prefix string) *Cache {
	return &Cache{rdb: rdb, prefix: prefix, guard: NewGuard(Cooldown)}
}

// Guard is the cache's guard, for other calls to the same Redis on the
// same path (the api's idempotency keys): one that found Redis hung spares
// the others the wait.
func (c *Cache) Guard() *Guard { return c.guard }

// Querier is the part of a pgx pool BoundPrefix needs.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// BoundPrefix is prefix bound to the database db is: prefix, then the
// database's deployment id, then the identity of its copy (Identity).
// Every Redis key prozess writes is under it, so deployments sharing one
// Redis and one --redis-prefix never read each other's entries, and
// neither does a clone or a restore of a database read the original's.
func BoundPrefix(ctx context.Context, db Querier, prefix string) (string, error) {
	var id uuid.UUID
	if err := db.QueryRow(ctx, `SELECT id FROM deployment`).Scan(&id); err != nil {
		return "", fmt.Errorf("reading the deployment id: %w", err)
	}
	copyID, err := Identity(ctx, db)
	if err != nil {
		return "", err
	}
	return prefix + id.String() + ":" + copyID + ":", nil
}

// Identity names this copy of the database: the cluster's system
// identifier (new for every initdb, so for a restore into another
// cluster), its WAL timeline (a point-in-time restore or a promoted
// replica starts a new one) and the database's oid (a clone made with
// CREATE DATABASE ... TEMPLATE, or by pg_dump into a new database, gets a
// new one), as "system.timeline.oid". The deployment id, a row, travels
// with every copy, so it cannot tell them apart.
//
// The system identifier and the timeline are readable by any role unless
// an administrator revoked pg_control_system or pg_current_wal_lsn (some
// managed services do); then the server's start time stands in for both
// ("start-<unix>"): every restore starts the server, so it still changes,
// at the cost of a cold cache after every restart. A standby (prozess
// check on a replica) has no insert position: its latest checkpoint's
// timeline is used.
//
// It is read when a process starts: one that runs on across a restore
// keeps the old binding, and what keeps it honest then is the api
// confirming every cache hit and idempotency hit in PostgreSQL.
func Identity(ctx context.Context, db Querier) (string, error) {
	var oid uint32
	if err := db.QueryRow(ctx, `SELECT oid FROM pg_database WHERE datname = current_database()`).Scan(&oid); err != nil {
		return "", fmt.Errorf("reading the database's oid: %w", err)
	}
	var system, timeline string
	err := db.QueryRow(ctx, `
		SELECT s.system_identifier::text,
			CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())::text
			ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::text END
		FROM pg_control_system() s`).Scan(&system, &timeline)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" { // insufficient_privilege
		var started int64
		if err := db.QueryRow(ctx, `SELECT extract(epoch FROM pg_postmaster_start_time())::bigint`).Scan(&started); err != nil {
			return "", fmt.Errorf("reading the server's start time: %w", err)
		}
		return fmt.Sprintf("start-%d.%d", started, oid), nil
	}
	if err != nil {
		return "", fmt.Errorf("reading the database system's identity: %w", err)
	}
	return fmt.Sprintf("%s.%s.%d", system, timeline, oid), nil
}

// Entry is one cached order: its immutable document and its status.
type Entry struct {
	Doc    []byte
	Status event.Status
}

func (c *Cache) key(id uuid.UUID) string { return c.prefix + "order:" + id.String() }

// Get returns the cached entry for an order, and false when there is none.
func (c *Cache) Get(ctx context.Context, id uuid.UUID) (Entry, bool, error) {
	var m []rueidis.RedisMessage
	err := c.guard.Do(ctx, func(ctx context.Context) (err error) {
		m, err = c.rdb.Do(ctx, c.rdb.B().Hmget().Key(c.key(id)).Field("doc", "status", "hold").Build()).ToArray()
		return err
	})
	if err != nil {
		return Entry{}, false, fmt.Errorf("reading status cache: %w", err)
	}
	doc, err1 := m[0].ToString()
	st, err2 := m[1].ToString()
	if err1 != nil || err2 != nil || doc == "" || !m[2].IsNil() {
		return Entry{}, false, nil
	}
	return Entry{Doc: []byte(doc), Status: event.Status(st)}, true, nil
}

// Put creates or advances an entry with its document.
func (c *Cache) Put(ctx context.Context, id uuid.UUID, e Entry) error {
	return c.exec(ctx, []rueidis.LuaExec{c.args(id, e.Status, string(e.Doc))})
}

// Update is one status change for Advance.
type Update struct {
	OrderID uuid.UUID
	Status  event.Status
}

// Advance moves entries forward; for an order not cached yet it leaves a
// status-only entry (a miss for readers; the next read fills the doc from
// PostgreSQL, and cannot move the status back).
func (c *Cache) Advance(ctx context.Context, us []Update) error {
	execs := make([]rueidis.LuaExec, len(us))
	for i, u := range us {
		execs[i] = c.args(u.OrderID, u.Status, "")
	}
	return c.exec(ctx, execs)
}

// Hold makes every later Get of these orders a miss, so their readers go
// to PostgreSQL: they have a dead letter to show.
func (c *Cache) Hold(ctx context.Context, ids []uuid.UUID) error {
	execs := make([]rueidis.LuaExec, len(ids))
	for i, id := range ids {
		execs[i] = rueidis.LuaExec{Keys: []string{c.key(id)}, Args: []string{strconv.Itoa(int(liveTTL.Seconds()))}}
	}
	err := c.guard.Do(ctx, func(ctx context.Context) error {
		for _, r := range hold.ExecMulti(ctx, c.rdb, execs...) {
			if err := r.Error(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("holding status cache entries: %w", err)
	}
	return nil
}

func (c *Cache) args(id uuid.UUID, s event.Status, doc string) rueidis.LuaExec {
	ttl := liveTTL
	if s.Terminal() {
		ttl = terminalTTL
	}
	return rueidis.LuaExec{
		Keys: []string{c.key(id)},
		Args: []string{string(s), strconv.Itoa(s.Rank()), doc, strconv.Itoa(int(ttl.Seconds()))},
	}
}

func (c *Cache) exec(ctx context.Context, execs []rueidis.LuaExec) error {
	if len(execs) == 0 {
		return nil
	}
	err := c.guard.Do(ctx, func(ctx context.Context) error {
		for _, r := range upsert.ExecMulti(ctx, c.rdb, execs...) {
			if err := r.Error(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("writing status cache: %w", err)
	}
	return nil
}
