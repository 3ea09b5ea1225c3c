package statuscache

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// ErrSkipped is a call the Guard did not make: Redis failed to answer
// within the cooldown before it.
var ErrSkipped = errors.New("redis skipped: it did not answer a moment ago")

// Cooldown is how long a Guard skips Redis after a call that ran out of
// time or lost its connection.
const Cooldown = time.Second

// Guard keeps every wait on Redis within its caller's deadline, and makes a
// Redis that stopped answering cost one call one bound, not every call.
//
// A context deadline alone does not do it. With Redis hung (its process
// stopped: connections open, nothing answering), a call that runs out of
// time makes rueidis close the connection; the next call redials, with its
// own context, and every concurrent caller waits for that redial (connect,
// HELLO) without looking at its own deadline. The status writer's cache
// update, bounded at 1 s, made most redials, so a request's 150 ms Redis
// calls waited about 1 s each: measured, 21 of 30 requests over 0.5 s, the
// slowest 2.0 s (goroutine dumps showed them in rueidis mux._pipe's
// WaitGroup). So the call runs in a goroutine its caller stops waiting for
// at its deadline (the goroutine ends when rueidis gives up, within its
// dial and write timeouts), and after such a failure the Guard answers
// ErrSkipped at once for Cooldown: the request path goes
// on with PostgreSQL alone, as it would with Redis down. A Redis error reply
// (including a miss) is an answer, not a failure.
type Guard struct {
	cooldown time.Duration
	until    atomic.Int64 // UnixNano before which calls are skipped
}

// NewGuard returns a guard that skips Redis for cooldown after a failure.
func NewGuard(cooldown time.Duration) *Guard { return &Guard{cooldown: cooldown} }

// Do runs fn with ctx, and returns by ctx's deadline whatever fn does.
func (g *Guard) Do(ctx context.Context, fn func(ctx context.Context) error) error {
	if time.Now().UnixNano() < g.until.Load() {
		return ErrSkipped
	}
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	select {
	case err := <-done:
		var reply *rueidis.RedisError
		if err != nil && !errors.As(err, &reply) && ctx.Err() != context.Canceled {
			g.trip()
		}
		return err
	case <-ctx.Done():
		if ctx.Err() == context.DeadlineExceeded {
			g.trip()
		}
		return fmt.Errorf("redis did not answer: %w", ctx.Err())
	}
}

func (g *Guard) trip() { g.until.Store(time.Now().Add(g.cooldown).UnixNano()) }
