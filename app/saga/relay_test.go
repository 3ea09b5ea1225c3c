package saga_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/schema/schematest"
)

// An order's events reach the topic in the order they were written, even
// when one of them fails and is tried again: the relay publishes a key's
// next row only once the one before it is settled. Had it published the
// next while the failed one waited, the saga would see, say, PaymentFailed
// before InventoryReserved.
func TestRelayKeepsEachKeysOrderAcrossFailures(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	b, err := saga.StartBroker("127.0.0.1:0", t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const topic = "ordered"
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.ListenAddrs()...), kgo.ConsumeTopics(topic), kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := kadm.NewClient(cl).CreateTopic(t.Context(), 3, 1, nil, topic); err != nil {
		t.Fatal(err)
	}
	// The first produce requests fail (for every partition), so the first
	// row of each key is tried again later while its successors wait.
	h := b.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: topic, Err: kerr.TopicAuthorizationFailed, Count: 3})
	const keys, perKey = 6, 5
	for i := range perKey {
		for k := range keys {
			schematest.Exec(t, pool, `INSERT INTO outbox (topic, key, value, header_bytes) VALUES ($1, convert_to($2, 'UTF8'), convert_to($3, 'UTF8'), '')`,
				topic, fmt.Sprint("order-", k), fmt.Sprint(i))
		}
	}
	r, err := saga.NewRelay(slog.New(slog.DiscardHandler), pool, saga.Conn{Brokers: b.ListenAddrs()}, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	got := map[string][]string{}
	for n, deadline := 0, time.Now().Add(60*time.Second); n < keys*perKey; {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d records published after 60 s", n, keys*perKey)
		}
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		fs := cl.PollFetches(pctx)
		pcancel()
		fs.EachRecord(func(rec *kgo.Record) {
			got[string(rec.Key)] = append(got[string(rec.Key)], string(rec.Value))
			n++
		})
	}
	if h.Hits() == 0 {
		t.Fatal("no produce request failed")
	}
	want := []string{"0", "1", "2", "3", "4"}
	for k, vs := range got {
		if !slices.Equal(vs, want) {
			t.Errorf("key %s published as %v, want %v", k, vs, want)
		}
	}
}

// A partition that takes no writes holds at most the cap of its records in
// the producer, and the rows behind them in the outbox (past a whole batch
// of that partition's rows) are still found and published: the producer's
// buffer never fills with one partition's records, and the others flow.
func TestRelayCapsWhatAStuckPartitionHoldsInFlight(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	b, err := saga.StartBroker("127.0.0.1:0", t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const topic, partitions = "capped", 3
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.ListenAddrs()...), kgo.ConsumeTopics(topic), kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := kadm.NewClient(cl).CreateTopic(t.Context(), partitions, 1, nil, topic); err != nil {
		t.Fatal(err)
	}
	// Partition 0 refuses; the fault also notes the highest record
	// sequence the producer ever sent it: how many of its records it held.
	var sent atomic.Int32
	h := b.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: topic, Partitions: []int32{0}, Err: kerr.NotEnoughReplicas, Count: -1,
		When: func(req kmsg.Request) bool {
			for _, tp := range req.(*kmsg.ProduceRequest).Topics {
				for _, p := range tp.Partitions {
					var rb kmsg.RecordBatch
					if p.Partition == 0 && rb.ReadFrom(p.Records) == nil && rb.FirstSequence+rb.NumRecords > sent.Load() {
						sent.Store(rb.FirstSequence + rb.NumRecords)
					}
				}
			}
			return true
		}})
	partitionOf := func(key string) int {
		return kgo.StickyKeyPartitioner(nil).ForTopic(topic).Partition(&kgo.Record{Key: []byte(key)}, partitions)
	}
	var stuck, healthy []string
	for i := 0; len(stuck) < 40 || len(healthy) < 20; i++ {
		k := fmt.Sprint("order-", i)
		if partitionOf(k) == 0 && len(stuck) < 40 {
			stuck = append(stuck, k)
		} else if partitionOf(k) != 0 && len(healthy) < 20 {
			healthy = append(healthy, k)
		}
	}
	for _, k := range append(slices.Clone(stuck), healthy...) { // partition 0's rows first
		schematest.Exec(t, pool, `INSERT INTO outbox (topic, key, value, header_bytes) VALUES ($1, convert_to($2, 'UTF8'), 'v', '')`, topic, k)
	}
	r, err := saga.NewRelay(slog.New(slog.DiscardHandler), pool, saga.Conn{Brokers: b.ListenAddrs()}, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	saga.SetRelayLimits(r, 10, 5)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	consume := func(n int, within time.Duration) map[string]int {
		t.Helper()
		got := map[string]int{}
		for total, deadline := 0, time.Now().Add(within); total < n; {
			if time.Now().After(deadline) {
				t.Fatalf("%d of %d records published within %s", total, n, within)
			}
			pctx, pcancel := context.WithTimeout(ctx, time.Second)
			fs := cl.PollFetches(pctx)
			pcancel()
			fs.EachRecord(func(rec *kgo.Record) { got[string(rec.Key)]++; total++ })
		}
		return got
	}
	got := consume(len(healthy), 20*time.Second)
	for _, k := range healthy {
		if got[k] != 1 {
			t.Fatalf("record %s published %d times while partition 0 refused writes", k, got[k])
		}
	}
	if n := sent.Load(); n == 0 || n > 5 {
		t.Fatalf("the producer sent partition 0 %d records, want 1 to 5 (the cap)", n)
	}
	h.Remove()
	got = consume(len(stuck), 30*time.Second)
	for _, k := range stuck {
		if got[k] != 1 {
			t.Fatalf("record %s of partition 0 published %d times after it healed", k, got[k])
		}
	}
}
