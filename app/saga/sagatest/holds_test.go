package sagatest

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// A test that faults the cluster waits for the tests using it, and a test
// arriving while it waits waits for it: the fault never lands in another
// test, and a stream of sharers cannot starve it.
func TestExclusiveWaitsForSharersAndKeepsNewOnesOut(t *testing.T) {
	h := newHolds()
	var mu sync.Mutex
	var got []string
	note := func(s string) { mu.Lock(); got = append(got, s); mu.Unlock() }
	var wg sync.WaitGroup
	run := func(name string, f func(t *testing.T)) {
		wg.Add(1)
		go func() { defer wg.Done(); t.Run(name, f) }()
	}

	aHolds, releaseA := make(chan struct{}), make(chan struct{})
	run("sharer a", func(t *testing.T) {
		h.share(t)
		h.share(t) // a second New in one test neither blocks nor double-counts
		note("a in")
		close(aHolds)
		<-releaseA
		note("a out")
	})
	<-aHolds
	run("exclusive", func(t *testing.T) {
		h.exclude(t)
		note("exclusive in")
		time.Sleep(50 * time.Millisecond)
		note("exclusive out")
	})
	for waiting := 0; waiting == 0; time.Sleep(time.Millisecond) {
		h.mu.Lock()
		waiting = h.waiting
		h.mu.Unlock()
	}
	run("sharer b", func(t *testing.T) {
		h.share(t)
		note("b in")
	})
	time.Sleep(50 * time.Millisecond)
	close(releaseA)
	wg.Wait()

	want := []string{"a in", "a out", "exclusive in", "exclusive out", "b in"}
	if !slices.Equal(got, want) {
		t.Fatalf("order %q, want %q", got, want)
	}
	if len(h.shared) != 0 || h.exclusive != nil {
		t.Fatalf("holds left after every test ended: %d shared, exclusive %v", len(h.shared), h.exclusive)
	}
}
