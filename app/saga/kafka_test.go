package saga_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

func admin(t *testing.T, brokers []string) *kadm.Client {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return kadm.NewClient(cl)
}

// topicState reads a topic's smallest replication factor and its configs,
// once the cluster has propagated the topic (right after creation a broker
// may still answer without partitions or configs).
func topicState(t *testing.T, adm *kadm.Client, topic string) (int, map[string]string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		md, err := adm.Metadata(t.Context(), topic)
		if err != nil {
			t.Fatal(err)
		}
		rf := 1 << 10
		td := md.Topics[topic]
		for _, p := range td.Partitions {
			rf = min(rf, len(p.Replicas))
		}
		cfg := map[string]string{}
		if rcs, err := adm.DescribeTopicConfigs(t.Context(), topic); err == nil {
			if rc, err := rcs.On(topic, nil); err == nil {
				for _, c := range rc.Configs {
					cfg[c.Key] = c.MaybeValue()
				}
			}
		}
		if td.Err == nil && len(td.Partitions) > 0 && (cfg["min.insync.replicas"] != "" || cfg["retention.ms"] != "") {
			return rf, cfg
		}
		if time.Now().After(deadline) {
			t.Fatalf("topic %s not described within 15s (%v, %d partitions, %d configs)", topic, td.Err, len(td.Partitions), len(cfg))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Topics are created durable: on a three-broker cluster replication factor
// 3 and min.insync.replicas 2 (on one broker, 1 and 1), and dead letters
// kept until removed. Read back from the cluster.
func TestTopicsAreDurable(t *testing.T) {
	t.Parallel()
	k := sagatest.New(t)
	adm := admin(t, k.Brokers)
	brokers, err := adm.ListBrokers(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	spec := saga.Topics{Topic: k.Topic, DLQ: k.Topic + ".dlq", Partitions: 3}
	if err := saga.EnsureTopics(t.Context(), saga.Conn{Brokers: k.Brokers}, spec, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	wantRF := min(3, len(brokers))
	wantISR := strconv.Itoa(max(1, wantRF-1))
	for _, topic := range []string{spec.Topic, spec.DLQ} {
		rf, cfg := topicState(t, adm, topic)
		if rf != wantRF || cfg["min.insync.replicas"] != wantISR {
			t.Errorf("%s: replication factor %d, min.insync.replicas %s; want %d and %s (%d brokers)",
				topic, rf, cfg["min.insync.replicas"], wantRF, wantISR, len(brokers))
		}
	}
	if _, cfg := topicState(t, adm, spec.DLQ); cfg["retention.ms"] != "-1" {
		t.Errorf("dead-letter topic retention.ms %s, want -1 (kept until replayed)", cfg["retention.ms"])
	}
	if len(brokers) >= 3 {
		t.Logf("on %d brokers: replication factor 3, min.insync.replicas 2", len(brokers))
	}
	// Asking for more copies than brokers is refused with the flag's name.
	tooMany := spec
	tooMany.ReplicationFactor = int16(len(brokers) + 1)
	if err := saga.EnsureTopics(t.Context(), saga.Conn{Brokers: k.Brokers}, tooMany, slog.New(slog.DiscardHandler)); err == nil ||
		!strings.Contains(err.Error(), "--replication-factor") {
		t.Errorf("replication factor above the broker count: %v", err)
	}
}

// An existing topic less durable than configured is reported in one line,
// and refused with Strict.
func TestWeakExistingTopicIsReported(t *testing.T) {
	t.Parallel()
	k := sagatest.New(t)
	adm := admin(t, k.Brokers)
	// Made by someone else with the cluster's defaults: one copy, dead
	// letters deleted after a day.
	day := "86400000"
	if _, err := adm.CreateTopic(t.Context(), 3, 1, nil, k.Topic); err != nil {
		t.Fatal(err)
	}
	if _, err := adm.CreateTopic(t.Context(), 3, 1, map[string]*string{"retention.ms": &day}, k.Topic+".dlq"); err != nil {
		t.Fatal(err)
	}
	topicState(t, adm, k.Topic+".dlq")
	spec := saga.Topics{Topic: k.Topic, DLQ: k.Topic + ".dlq", Partitions: 3, ReplicationFactor: 1, MinInSync: 1}
	var logs bytes.Buffer
	if err := saga.EnsureTopics(t.Context(), saga.Conn{Brokers: k.Brokers}, spec, slog.New(slog.NewTextHandler(&logs, nil))); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "topic "+k.Topic+".dlq is less durable than configured: retention.ms 86400000 (want -1") {
		t.Errorf("no warning about the dead letters' retention:\n%s", logs.String())
	}
	spec.Strict = true
	err := saga.EnsureTopics(t.Context(), saga.Conn{Brokers: k.Brokers}, spec, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "--strict-topics") {
		t.Fatalf("strict start on a weak topic: %v", err)
	}
}

// skipAll handles no event type: the consumer only reads and commits.
type skipAll struct{}

func (skipAll) Handles(event.Type) bool { return false }
func (skipAll) Handle(context.Context, pgx.Tx, []event.Event) ([]event.Event, error) {
	return nil, nil
}

func produce(t *testing.T, brokers []string, topic string, n int) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.DefaultProduceTopic(topic), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for i := range n {
		if err := cl.ProduceSync(t.Context(), &kgo.Record{Partition: 0, Value: []byte(strconv.Itoa(i))}).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
}

func committed(t *testing.T, adm *kadm.Client, group, topic string) int64 {
	t.Helper()
	offs, err := adm.FetchOffsets(t.Context(), group)
	if kerr.IsRetriable(err) {
		return -1 // a fresh cluster's group coordinator still loading: ask again
	}
	if err != nil {
		t.Fatal(err)
	}
	o, ok := offs.Lookup(topic, 0)
	if !ok {
		return -1
	}
	return o.At
}

// runUntil runs c until cond holds (then stops it) or it returns; it
// returns Run's error.
func runUntil(t *testing.T, c *saga.Consumer, cond func() bool) error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case err := <-done:
			cancel()
			return err
		case <-deadline:
			cancel()
			t.Fatal("consumer neither reached the condition nor stopped within 60s")
		case <-time.After(50 * time.Millisecond):
			if cond() {
				cancel()
				return <-done
			}
		}
	}
}

// A consumer whose committed offset was deleted (by retention; here by
// DeleteRecords) stops with an error naming group, partition and offsets,
// and skips nothing; with ResetOutOfRange it goes on from the log start.
func TestOutOfRangeStopsInsteadOfSkipping(t *testing.T) {
	t.Parallel()
	k := sagatest.New(t)
	pool := schematest.NewPool(t)
	adm := admin(t, k.Brokers)
	spec := saga.Topics{Topic: k.Topic, DLQ: k.Topic + ".dlq", Partitions: 1}
	if err := saga.EnsureTopics(t.Context(), saga.Conn{Brokers: k.Brokers}, spec, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	group := k.GroupPrefix + "reader"
	newConsumer := func(reset bool) *saga.Consumer {
		c, err := saga.NewConsumer("reader", slog.New(slog.DiscardHandler), pool, skipAll{},
			saga.ConsumerConfig{Kafka: saga.Conn{Brokers: k.Brokers}, Topic: k.Topic, DLQTopic: spec.DLQ, Group: group, ResetOutOfRange: reset})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	produce(t, k.Brokers, k.Topic, 10)
	first := newConsumer(false)
	if err := runUntil(t, first, func() bool { return committed(t, adm, group, k.Topic) == 10 }); err != nil {
		t.Fatal(err)
	}
	first.Close()

	produce(t, k.Brokers, k.Topic, 10)
	res, err := adm.DeleteRecords(t.Context(), kadm.Offsets{k.Topic: {0: {Topic: k.Topic, Partition: 0, At: 15}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Error(); err != nil {
		t.Fatal(err)
	}
	second := newConsumer(false)
	err = runUntil(t, second, func() bool { return false })
	second.Close()
	if err == nil {
		t.Fatal("the consumer went on past deleted records")
	}
	for _, want := range []string{"consumer group " + group, "partition " + k.Topic + "/0", "committed offset 10", "starts at 15", "--reset-out-of-range"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if got := committed(t, adm, group, k.Topic); got != 10 {
		t.Fatalf("committed offset moved to %d while stopped", got)
	}
	// The operator decides to go on without the deleted records.
	if err := runUntil(t, newConsumer(true), func() bool { return committed(t, adm, group, k.Topic) == 20 }); err != nil {
		t.Fatal(err)
	}
}

// generation returns the group generation the consumer is in, once joined.
func generation(t *testing.T, c *saga.Consumer) int32 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !c.Joined() {
		if time.Now().After(deadline) {
			t.Fatal("consumer did not join its group within 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return c.Generation()
}

// With an instance id, a restarted consumer gets its partitions back in the
// same group generation: no rebalance, as in a rolling restart. Without
// one, the restart is a new member and a new generation.
func TestStaticMembershipSurvivesRestart(t *testing.T) {
	t.Parallel()
	k := sagatest.New(t)
	pool := schematest.NewPool(t)
	spec := saga.Topics{Topic: k.Topic, DLQ: k.Topic + ".dlq", Partitions: 2}
	if err := saga.EnsureTopics(t.Context(), saga.Conn{Brokers: k.Brokers}, spec, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		instance string
		same     bool
	}{{"inventory-1", true}, {"", false}} {
		group := k.GroupPrefix + "static-" + strconv.FormatBool(tc.same)
		start := func() (*saga.Consumer, func()) {
			c, err := saga.NewConsumer("static", slog.New(slog.DiscardHandler), pool, skipAll{},
				saga.ConsumerConfig{Kafka: saga.Conn{Brokers: k.Brokers}, Topic: k.Topic, DLQTopic: spec.DLQ, Group: group, InstanceID: tc.instance})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- c.Run(ctx) }()
			return c, func() {
				cancel()
				if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
					t.Error(err)
				}
				c.Close()
			}
		}
		c1, stop1 := start()
		g1 := generation(t, c1)
		stop1()
		c2, stop2 := start()
		g2 := generation(t, c2)
		stop2()
		if (g1 == g2) != tc.same {
			t.Errorf("instance id %q: generation %d before the restart, %d after; want same=%v", tc.instance, g1, g2, tc.same)
		}
	}
}

// Inbox rows are pruned once no redelivery can bring their event back: after
// the topic's retention.ms plus the margin, never while the topic keeps
// records forever.
func TestInboxPrunedAfterTopicRetention(t *testing.T) {
	t.Parallel()
	k := sagatest.New(t)
	pool := schematest.NewPool(t)
	adm := admin(t, k.Brokers)
	minute := "60000"
	if _, err := adm.CreateTopic(t.Context(), 1, 1, map[string]*string{"retention.ms": &minute}, k.Topic); err != nil {
		t.Fatal(err)
	}
	forever := "-1"
	if _, err := adm.CreateTopic(t.Context(), 1, 1, map[string]*string{"retention.ms": &forever}, k.Topic+".dlq"); err != nil {
		t.Fatal(err)
	}
	topicState(t, adm, k.Topic) // created and described
	topicState(t, adm, k.Topic+".dlq")
	retention, err := saga.InboxRetention(t.Context(), saga.Conn{Brokers: k.Brokers}, k.Topic, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if retention != 61*time.Second {
		t.Fatalf("inbox retention %s, want the topic's 1m plus the 1s margin", retention)
	}
	schematest.Exec(t, pool, `INSERT INTO inbox (consumer, event_id, processed_at) SELECT 'inventory', gen_random_uuid(), now() - interval '2 minutes' FROM generate_series(1, 25000)`)
	schematest.Exec(t, pool, `INSERT INTO inbox (consumer, event_id, processed_at) SELECT 'inventory', gen_random_uuid(), now() - interval '30 seconds' FROM generate_series(1, 7)`)
	n, err := saga.PruneInbox(t.Context(), pool, retention)
	if err != nil {
		t.Fatal(err)
	}
	if left := schematest.Int(t, pool, `SELECT count(*) FROM inbox`); n != 25000 || left != 7 {
		t.Fatalf("pruned %d, %d left; want 25000 pruned (older than %s) and the 7 recent ones kept", n, left, retention)
	}
	// A topic that keeps its records forever can redeliver anything: keep
	// every inbox row.
	if r, err := saga.InboxRetention(t.Context(), saga.Conn{Brokers: k.Brokers}, k.Topic+".dlq", time.Second); err != nil || r != 0 {
		t.Fatalf("retention for a topic kept forever: %s, %v; want 0 (keep)", r, err)
	}
	if n, err := saga.PruneInbox(t.Context(), pool, 0); err != nil || n != 0 {
		t.Fatalf("pruning with retention 0: %d, %v", n, err)
	}
}
