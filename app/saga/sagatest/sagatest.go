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
	name := schematest.Name("prozess-test-")
	k := Kafka{Brokers: strings.Split(os.Getenv("PROZESS_TEST_KAFKA_BROKERS"), ","), Topic: name, GroupPrefix: name + "-"}
	t.Cleanup(func() { k.remove(t) })
	return k
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
