package embedded

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/alicebob/miniredis/v2"
)

// Redis is an in-process Redis (miniredis) on a TCP address, so the
// idempotency fast path and the status cache run the same code as against a
// real Redis, and `prozess check` in another process can read the cache.
// It keeps nothing across restarts, which a cache may: PostgreSQL backs
// everything it holds.
type Redis struct {
	srv  *miniredis.Miniredis
	log  *slog.Logger
	done chan struct{}
}

// StartRedis serves an in-process Redis on addr; an empty addr means
// UsualRedisAddr, or a free port on its host when that is taken.
func StartRedis(addr string, log *slog.Logger) (*Redis, error) {
	srv := miniredis.NewMiniRedis()
	chosen, err := ChooseAddr(addr, UsualRedisAddr)
	if err == nil {
		if addr == "" && chosen != UsualRedisAddr {
			log.Info("embedded Redis: the usual address is taken, using a free port", "usual", UsualRedisAddr, "addr", chosen)
		}
		err = srv.StartAddr(chosen)
	}
	if err != nil {
		return nil, fmt.Errorf("embedded Redis cannot listen on %s (a Redis already running there?): "+
			"pass --redis-addr to use that server, or move the embedded one with --embedded-redis-addr", addr)
	}
	log.Info("embedded Redis started", "addr", srv.Addr())
	r := &Redis{srv: srv, log: log, done: make(chan struct{})}
	go r.clock()
	return r, nil
}

// clock moves miniredis's time with the wall clock. miniredis expires keys
// only when told time has passed; without this a status cache entry, whose
// lifetime is what heals a missed update, would never expire.
func (r *Redis) clock() {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-r.done:
			return
		case now := <-t.C:
			r.srv.SetTime(now)
			r.srv.FastForward(now.Sub(last))
			last = now
		}
	}
}

// Addr is where it listens.
func (r *Redis) Addr() string { return r.srv.Addr() }

// Close stops it.
func (r *Redis) Close() {
	close(r.done)
	r.srv.Close()
}
