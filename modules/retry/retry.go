// Package retry is the one backoff every retry loop in prozess waits with
// (the consumer loop, the outbox relay, the api's key-cache listener), so a
// fleet of processes that lost the same server do not hammer it in step
// when it comes back.
package retry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Base and Cap bound the backoff: the first retry waits about Base, later
// ones double up to Cap.
const (
	Base = 100 * time.Millisecond
	Cap  = 5 * time.Second
)

// Backoff is the wait before retry number attempt (counted from 0): capped
// exponential with jitter, between half and all of min(Base<<attempt, Cap).
func Backoff(attempt int) time.Duration {
	d := min(Base<<min(max(attempt, 0), 16), Cap)
	return d/2 + rand.N(d/2+1)
}

// Wait sleeps Backoff(attempt), or until ctx is done, when it returns
// ctx.Err().
func Wait(ctx context.Context, attempt int) error {
	t := time.NewTimer(Backoff(attempt))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
