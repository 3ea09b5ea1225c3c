package saga_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// applyAll handles OrderCreated with no effect of its own: what is measured
// is the runtime (poll, decode, inbox claim, transaction, commit, offsets).
type applyAll struct{}

func (applyAll) Handles(t event.Type) bool { return t == event.OrderCreated }
func (applyAll) Handle(context.Context, pgx.Tx, []event.Event) ([]event.Event, error) {
	return nil, nil
}

func records(b *testing.B, topic string, n int) []*kgo.Record {
	b.Helper()
	recs := make([]*kgo.Record, n)
	for i := range recs {
		ev, err := event.New(event.OrderCreated, uuid.New(), "api", event.Created{UserID: "u1", Items: []event.Item{{ProductID: "p", Qty: 1}}, AmountCents: 1})
		if err != nil {
			b.Fatal(err)
		}
		recs[i] = ev.Record(topic)
	}
	return recs
}

// benchSetup is a topic with its dead-letter topic and a database, for a
// benchmark.
func benchSetup(b *testing.B) (sagatest.Kafka, *pgxpool.Pool, saga.Topics) {
	b.Helper()
	k := sagatest.New(b)
	pool := schematest.NewPool(b)
	spec := saga.Topics{Topic: k.Topic, DLQ: k.Topic + ".dlq", Partitions: 6}
	if err := saga.EnsureTopics(b.Context(), saga.Conn{Brokers: k.Brokers}, spec, slog.New(slog.DiscardHandler)); err != nil {
		b.Fatal(err)
	}
	return k, pool, spec
}

// measure runs run until finished says the b.N records are through, and
// reports records per second from the start of run.
func measure(b *testing.B, run func(ctx context.Context) error, finished func() bool) {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime(b)
	go func() { done <- run(ctx) }()
	for !finished() {
		time.Sleep(time.Millisecond)
	}
	elapsed, cpu := time.Since(start), cpuTime(b)-cpu0
	b.StopTimer()
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "records/s")
	// The process's CPU per record (the runtime and the test's kfake
	// broker, not PostgreSQL): what a change to the hot path saves, and,
	// unlike records/s, little moved by other work sharing the machine.
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/record")
}

// BenchmarkConsumer is records per second through one participant's
// consumer loop, against the tests' PostgreSQL: b.N records on a 6-partition
// topic, timed from the first poll until all are applied.
func BenchmarkConsumer(b *testing.B) {
	k, pool, spec := benchSetup(b)
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(b.Context(), records(b, k.Topic, b.N)...).FirstErr(); err != nil {
		b.Fatal(err)
	}
	c, err := saga.NewConsumer("bench", slog.New(slog.DiscardHandler), pool, applyAll{},
		saga.ConsumerConfig{Kafka: saga.Conn{Brokers: k.Brokers}, Topic: k.Topic, DLQTopic: spec.DLQ, Group: k.GroupPrefix + "bench"})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	measure(b, c.Run, func() bool { return c.Stats().Applied.Load() >= int64(b.N) })
	b.ReportMetric(float64(c.Stats().Batches.Load()), "transactions")
}

// BenchmarkRelay is outbox rows per second published by the relay: b.N
// rows written up front, timed until the outbox is empty.
func BenchmarkRelay(b *testing.B) {
	k, pool, _ := benchSetup(b)
	recs := records(b, k.Topic, b.N)
	for i := 0; i < len(recs); i += 1000 {
		if err := pgx.BeginFunc(b.Context(), pool, func(tx pgx.Tx) error {
			return event.WriteOutbox(b.Context(), tx, recs[i:min(i+1000, len(recs))]...)
		}); err != nil {
			b.Fatal(err)
		}
	}
	r, err := saga.NewRelay(slog.New(slog.DiscardHandler), pool, saga.Conn{Brokers: k.Brokers}, nil, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	measure(b, r.Run, func() bool { return schematest.Int(b, pool, `SELECT count(*) FROM outbox`) == 0 })
}
