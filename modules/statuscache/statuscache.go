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
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/redis/rueidis"

	"github.com/prozess/prozess/modules/event"
)

// TTLs: a non-terminal entry can go stale if Redis drops one update, so it
// lives briefly; a terminal status never changes again.
const (
	liveTTL     = time.Minute
	terminalTTL = 24 * time.Hour
)

// upsert sets status (and doc, when given) only when the entry's rank is
// lower than the new one. With ARGV[4] = "1" it only advances an entry that
// exists: the status writer has no doc to create one with.
var upsert = rueidis.NewLuaScript(`
local cur = redis.call('HGET', KEYS[1], 'rank')
if cur == false then
  if ARGV[4] == '1' then return 0 end
elseif tonumber(cur) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'rank', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'doc', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
`)

// Cache reads and writes order status entries under a key prefix, so several
// deployments (and parallel tests) can share one Redis.
type Cache struct {
	rdb    rueidis.Client
	prefix string
}

// New returns a cache using rdb with keys under prefix.
func New(rdb rueidis.Client, prefix string) *Cache { return &Cache{rdb: rdb, prefix: prefix} }

// Entry is one cached order: its immutable document and its status.
type Entry struct {
	Doc    []byte
	Status event.Status
}

func (c *Cache) key(id uuid.UUID) string { return c.prefix + "order:" + id.String() }

// Get returns the cached entry for an order, and false when there is none.
func (c *Cache) Get(ctx context.Context, id uuid.UUID) (Entry, bool, error) {
	m, err := c.rdb.Do(ctx, c.rdb.B().Hmget().Key(c.key(id)).Field("doc", "status").Build()).ToArray()
	if err != nil {
		return Entry{}, false, fmt.Errorf("reading status cache: %w", err)
	}
	doc, err1 := m[0].ToString()
	st, err2 := m[1].ToString()
	if err1 != nil || err2 != nil || doc == "" {
		return Entry{}, false, nil
	}
	return Entry{Doc: []byte(doc), Status: event.Status(st)}, true, nil
}

// Put creates or advances an entry with its document.
func (c *Cache) Put(ctx context.Context, id uuid.UUID, e Entry) error {
	return c.exec(ctx, []rueidis.LuaExec{c.args(id, e.Status, string(e.Doc), false)})
}

// Update is one status change for Advance.
type Update struct {
	OrderID uuid.UUID
	Status  event.Status
}

// Advance moves existing entries forward; entries that are absent stay
// absent (the next read fills them from PostgreSQL).
func (c *Cache) Advance(ctx context.Context, us []Update) error {
	execs := make([]rueidis.LuaExec, len(us))
	for i, u := range us {
		execs[i] = c.args(u.OrderID, u.Status, "", true)
	}
	return c.exec(ctx, execs)
}

func (c *Cache) args(id uuid.UUID, s event.Status, doc string, onlyExisting bool) rueidis.LuaExec {
	ttl := liveTTL
	if s.Terminal() {
		ttl = terminalTTL
	}
	only := "0"
	if onlyExisting {
		only = "1"
	}
	return rueidis.LuaExec{
		Keys: []string{c.key(id)},
		Args: []string{string(s), strconv.Itoa(s.Rank()), doc, only, strconv.Itoa(int(ttl.Seconds()))},
	}
}

func (c *Cache) exec(ctx context.Context, execs []rueidis.LuaExec) error {
	if len(execs) == 0 {
		return nil
	}
	for _, r := range upsert.ExecMulti(ctx, c.rdb, execs...) {
		if err := r.Error(); err != nil {
			return fmt.Errorf("writing status cache: %w", err)
		}
	}
	return nil
}
