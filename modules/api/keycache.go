package api

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/retry"
)

// keysChannel is the PostgreSQL channel RevokeKey notifies, with the key's
// id as payload, in the revoking transaction.
const keysChannel = "prozess_api_keys"

// maxCachedKeys bounds the cache; past it, it starts over.
const maxCachedKeys = 100_000

// keyCache remembers valid keys, so a request does not cost a database
// round trip to authenticate. Revocation stays immediate: RevokeKey
// notifies keysChannel when it commits and every api process drops the key
// from its cache within milliseconds. Entries are used only while this
// process is listening; while it is not (start-up, a lost connection) every
// request goes to the database, and reconnecting starts from an empty
// cache, so a notification missed in between cannot leave a revoked key
// working. A key revoked by hand in SQL, without the notification, works on
// for at most ttl.
type keyCache struct {
	ttl time.Duration

	mu        sync.Mutex
	listening bool
	gen       uint64 // bumped by every revocation and every (re)connect
	entries   map[[sha256.Size]byte]cachedKey
}

type cachedKey struct {
	p       Principal
	expires time.Time
}

func newKeyCache(ttl time.Duration) *keyCache {
	return &keyCache{ttl: ttl, entries: map[[sha256.Size]byte]cachedKey{}}
}

// get returns the cached principal for a key's hash, if any may be used.
func (c *keyCache) get(h [sha256.Size]byte) (Principal, bool) {
	if c == nil {
		return Principal{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[h]
	if !ok || !c.listening || time.Now().After(e.expires) {
		return Principal{}, false
	}
	return e.p, true
}

// begin returns the generation to hand to put after reading the database:
// a revocation noticed in between makes put a no-op, so a lookup that read
// the key just before its revocation cannot cache it after.
func (c *keyCache) begin() uint64 {
	if c == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

func (c *keyCache) put(gen uint64, h [sha256.Size]byte, p Principal) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen || !c.listening {
		return
	}
	if len(c.entries) >= maxCachedKeys {
		c.entries = map[[sha256.Size]byte]cachedKey{}
	}
	c.entries[h] = cachedKey{p: p, expires: time.Now().Add(c.ttl)}
}

// revoked drops every entry of key id.
func (c *keyCache) revoked(id string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for h, e := range c.entries {
		if e.p.KeyID == id {
			delete(c.entries, h)
		}
	}
}

// setListening empties the cache and says whether it may be used.
func (c *keyCache) setListening(on bool) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.listening = on
	clear(c.entries)
}

// followRevocations listens for revocations until ctx ends, reconnecting
// after a failure: each revoked key leaves the key cache and its open live
// streams end (a revoked admin key must stop seeing every order at once).
// After every (re)connect the keys of the open streams are checked in
// PostgreSQL, so a revocation missed while not listening ends its streams
// too.
func (a *API) followRevocations(ctx context.Context) {
	if a.auth.Disabled {
		return
	}
	for attempt := 0; ctx.Err() == nil; attempt++ {
		err := a.listenOnce(ctx)
		a.keys.setListening(false)
		if ctx.Err() != nil {
			return
		}
		a.log.Warn("not following API key revocations; key cache off, reconnecting", "err", err)
		if retry.Wait(ctx, attempt) != nil {
			return
		}
	}
}

func (a *API) listenOnce(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, a.pool.Config().ConnConfig.Copy())
	if err != nil {
		return fmt.Errorf("connecting: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+keysChannel); err != nil {
		return fmt.Errorf("listening for revocations: %w", err)
	}
	a.keys.setListening(true)
	if err := a.endRevokedStreams(ctx, conn); err != nil {
		return err
	}
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return fmt.Errorf("waiting for revocations: %w", err)
		}
		a.keys.revoked(n.Payload)
		if ended := a.live.endKey(n.Payload); ended > 0 {
			a.log.Info("API key revoked: its live streams ended", "key_id", n.Payload, "streams", ended)
		}
	}
}

// endRevokedStreams ends the open streams of keys revoked already.
func (a *API) endRevokedStreams(ctx context.Context, conn *pgx.Conn) error {
	ids := a.live.keyIDs()
	if len(ids) == 0 {
		return nil
	}
	rows, err := conn.Query(ctx, `SELECT id FROM api_keys WHERE id = ANY($1) AND revoked_at IS NOT NULL`, ids)
	if err != nil {
		return fmt.Errorf("checking the keys of open streams: %w", err)
	}
	revoked, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("checking the keys of open streams: %w", err)
	}
	for _, id := range revoked {
		a.live.endKey(id)
	}
	return nil
}
