package retry_test

import (
	"context"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/retry"
)

// Every wait lies within its bounds: half to all of the doubled base,
// never above the cap, whatever the attempt.
func TestBackoffBounds(t *testing.T) {
	for attempt := -1; attempt < 80; attempt++ {
		full := min(retry.Base<<min(max(attempt, 0), 16), retry.Cap)
		for range 50 {
			d := retry.Backoff(attempt)
			if d < full/2 || d > full {
				t.Fatalf("Backoff(%d) = %s, want %s to %s", attempt, d, full/2, full)
			}
		}
	}
	if retry.Backoff(100) > retry.Cap {
		t.Fatal("backoff above its cap")
	}
}

// Jitter spreads the waits: 50 draws of one attempt are not all equal.
func TestBackoffJitters(t *testing.T) {
	seen := map[time.Duration]bool{}
	for range 50 {
		seen[retry.Backoff(5)] = true
	}
	if len(seen) < 10 {
		t.Fatalf("only %d distinct waits in 50 draws", len(seen))
	}
}

// Wait returns the context's error as soon as it is cancelled.
func TestWaitCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	if err := retry.Wait(ctx, 10); err != context.Canceled {
		t.Fatalf("Wait = %v, want context.Canceled", err)
	}
	if time.Since(start) > time.Second {
		t.Fatal("Wait did not return at cancellation")
	}
	if err := retry.Wait(context.Background(), 0); err != nil {
		t.Fatalf("Wait = %v", err)
	}
}
