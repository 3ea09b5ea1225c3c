// Package sagatest gives each test a Kafka of its own: a kfake broker, or,
// when PROZESS_TEST_KAFKA_BROKERS names a real cluster, a topic and consumer
// group prefix of its own on that cluster, deleted when the test ends. Tests
// run in parallel and leave nothing behind either way.
package sagatest

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/schema/schematest"
)

// Real reports whether tests run against the cluster
// PROZESS_TEST_KAFKA_BROKERS names.
func Real() bool { return os.Getenv("PROZESS_TEST_KAFKA_BROKERS") != "" }

// Kafka is a test's Kafka: where, and the names it owns there.
type Kafka struct {
	Brokers     []string
	Topic       string // the saga topic; its dead letters are Topic+".dlq"
	GroupPrefix string
}

// New returns the test's Kafka: the real cluster with fresh names, or a
// kfake broker of its own (default names: it is the test's alone).
func New(t testing.TB) Kafka {
	t.Helper()
	if !Real() {
		b, err := saga.StartBroker("127.0.0.1:0", t.TempDir(), slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Close)
		return Kafka{Brokers: b.ListenAddrs(), Topic: "order-events", GroupPrefix: "prozess-"}
	}
	cluster.share(t)
	name := schematest.Name("prozess-test-")
	k := Kafka{Brokers: strings.Split(os.Getenv("PROZESS_TEST_KAFKA_BROKERS"), ","), Topic: name, GroupPrefix: name + "-"}
	t.Cleanup(func() { k.remove(t) })
	return k
}

// Exclusive gives the calling test the real cluster to itself, for a test
// that kills, stops or restarts its brokers: it waits until no other test
// of this process uses the cluster, and tests calling New after it wait
// until it has ended. Call it before New (directly or through a helper).
// On kfake, where each test has a broker of its own, it does nothing.
//
// Without it a broker fault is a fault in every test running beside it:
// CI saw a relay-takeover test's orders wait 30 s for a consumer group
// whose coordinator another test had just killed.
func Exclusive(t testing.TB) {
	t.Helper()
	if Real() {
		cluster.exclude(t)
	}
}

// cluster is who uses the real cluster in this test process. It is the
// one package-level variable here because the cluster is one per process
// (PROZESS_TEST_KAFKA_BROKERS) and tests reach it from many packages'
// helpers; a test binary is one package, so this covers every test that
// could run beside another.
var cluster = newHolds()

// holds is a readers-writer hold keyed by test, so a test may call New
// more than once without deadlocking behind a waiting exclusive test, and
// waiting exclusive tests keep new sharers out (no starvation).
type holds struct {
	mu        sync.Mutex
	changed   *sync.Cond
	shared    map[testing.TB]bool
	exclusive testing.TB
	waiting   int
}

func newHolds() *holds {
	h := &holds{shared: map[testing.TB]bool{}}
	h.changed = sync.NewCond(&h.mu)
	return h
}

func (h *holds) share(t testing.TB) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.exclusive == t || h.shared[t] {
		return
	}
	for h.exclusive != nil || h.waiting > 0 {
		h.changed.Wait()
	}
	h.shared[t] = true
	t.Cleanup(func() { h.release(func() { delete(h.shared, t) }) })
}

func (h *holds) exclude(t testing.TB) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.shared[t] {
		t.Fatal("sagatest.Exclusive must come before sagatest.New in the same test")
	}
	if h.exclusive == t {
		return
	}
	start := time.Now()
	h.waiting++
	for h.exclusive != nil || len(h.shared) > 0 {
		h.changed.Wait()
	}
	h.waiting--
	h.exclusive = t
	t.Logf("has the Kafka cluster to itself (waited %s for the tests using it)", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() { h.release(func() { h.exclusive = nil }) })
}

func (h *holds) release(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	f()
	h.changed.Broadcast()
}

// remove deletes the test's topics and consumer groups from the cluster.
func (k Kafka) remove(t testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...))
	if err != nil {
		t.Errorf("cleaning up Kafka: %v", err)
		return
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	if groups, err := adm.ListGroups(ctx); err == nil {
		var mine []string
		for _, g := range groups.Groups() {
			if strings.HasPrefix(g, k.GroupPrefix) {
				mine = append(mine, g)
			}
		}
		if len(mine) > 0 {
			if _, err := adm.DeleteGroups(ctx, mine...); err != nil {
				t.Logf("deleting consumer groups %v: %v", mine, err)
			}
		}
	}
	if _, err := adm.DeleteTopics(ctx, k.Topic, k.Topic+".dlq"); err != nil {
		t.Errorf("deleting topics %s: %v", k.Topic, err)
	}
}
