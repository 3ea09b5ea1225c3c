package loadgen

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
)

// ProbeConfig is one plain-client probe of a broker: no saga, no database.
type ProbeConfig struct {
	Kafka             saga.Conn
	Rate              float64 // records per second
	Duration          time.Duration
	Partitions        int32
	ReplicationFactor int16 // 0: 3, or the number of brokers when fewer (as prozess's own topics)
}

// ProbeResult is what a probe measured: the floor a saga hop on the same
// broker stands on.
type ProbeResult struct {
	Sent     int     `json:"sent"`
	Received int     `json:"received"`
	Produce  Summary `json:"produce_acks_all"`   // send -> acknowledged by every in-sync replica
	EndToEnd Summary `json:"produce_to_consume"` // send -> fetched by a consumer
}

// Probe measures what one hop of the saga costs on the broker alone, for
// comparison with `loadgen --hops`: a producer as the relay's (acks=all, no
// linger) sends small keyed records at Rate to a fresh topic, and a consumer
// as a participant's (fetching as soon as a record is there, at most a
// second's wait) reads them; each record carries its send time. The topic
// is deleted afterwards.
func Probe(ctx context.Context, cfg ProbeConfig) (ProbeResult, error) {
	var res ProbeResult
	if cfg.Rate <= 0 || cfg.Duration <= 0 {
		return res, fmt.Errorf("--rate and --duration must be positive")
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	topic := "prozess-probe-" + hex.EncodeToString(b)
	admin, err := cfg.Kafka.Client()
	if err != nil {
		return res, fmt.Errorf("probe: %w", err)
	}
	defer admin.Close()
	adm := kadm.NewClient(admin)
	rf := cfg.ReplicationFactor
	if rf <= 0 {
		bs, err := adm.ListBrokers(ctx)
		if err != nil {
			return res, fmt.Errorf("probe: listing brokers: %w", err)
		}
		rf = int16(min(3, len(bs)))
	}
	cr, err := adm.CreateTopic(ctx, max(cfg.Partitions, 1), rf, map[string]*string{"min.insync.replicas": ptr(fmt.Sprint(min(2, rf)))}, topic)
	if err == nil {
		err = cr.Err
	}
	if err != nil {
		return res, fmt.Errorf("probe: creating topic %s: %w", topic, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_, _ = adm.DeleteTopics(dctx, topic)
	}()

	producer, err := cfg.Kafka.Client(kgo.RequiredAcks(kgo.AllISRAcks()), kgo.ProducerLinger(0), kgo.DefaultProduceTopic(topic))
	if err != nil {
		return res, fmt.Errorf("probe: %w", err)
	}
	defer producer.Close()
	consumer, err := cfg.Kafka.Client(kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(time.Second))
	if err != nil {
		return res, fmt.Errorf("probe: %w", err)
	}
	defer consumer.Close()
	var mu sync.Mutex
	var produce, e2e []time.Duration
	cctx, stopConsumer := context.WithCancel(ctx)
	defer stopConsumer()
	consumed, warm := make(chan struct{}), make(chan struct{})
	var warmOnce sync.Once
	go func() {
		defer close(consumed)
		for {
			fs := consumer.PollFetches(cctx)
			if cctx.Err() != nil || fs.IsClientClosed() {
				return
			}
			now := time.Now()
			fs.EachRecord(func(r *kgo.Record) {
				if string(r.Key) == "warm-up" {
					warmOnce.Do(func() { close(warm) })
					return
				}
				if len(r.Value) != 8 {
					return
				}
				mu.Lock()
				e2e = append(e2e, now.Sub(time.Unix(0, int64(binary.BigEndian.Uint64(r.Value)))))
				mu.Unlock()
			})
		}
	}()
	// Warm both up (metadata, connections, the consumer's first fetches)
	// before timing: the schedule starts once the warm-up record is read.
	if err := producer.ProduceSync(ctx, &kgo.Record{Key: []byte("warm-up"), Value: stampValue(time.Now())}).FirstErr(); err != nil {
		return res, fmt.Errorf("probe: producing to %s: %w", topic, err)
	}
	select {
	case <-warm:
	case <-time.After(30 * time.Second):
		return res, fmt.Errorf("probe: the consumer did not read %s within 30s", topic)
	case <-ctx.Done():
		return res, ctx.Err()
	}
	var wg sync.WaitGroup
	for i, due := range Schedule(time.Now(), cfg.Rate, cfg.Duration) {
		if wait := time.Until(due); wait > 0 {
			select {
			case <-ctx.Done():
				return res, ctx.Err()
			case <-time.After(wait):
			}
		}
		sent := time.Now()
		wg.Add(1)
		res.Sent++
		producer.Produce(ctx, &kgo.Record{Key: []byte(fmt.Sprint(i)), Value: stampValue(sent)}, func(_ *kgo.Record, err error) {
			defer wg.Done()
			if err == nil {
				mu.Lock()
				produce = append(produce, time.Since(sent))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n := len(e2e)
		mu.Unlock()
		if n >= res.Sent {
			break
		}
	}
	stopConsumer()
	<-consumed
	mu.Lock()
	defer mu.Unlock()
	res.Received = len(e2e)
	res.Produce, res.EndToEnd = Summarize(produce), Summarize(e2e)
	if len(produce) < res.Sent {
		return res, fmt.Errorf("probe: %d of %d records not acknowledged", res.Sent-len(produce), res.Sent)
	}
	return res, nil
}

func stampValue(t time.Time) []byte { return binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano())) }

func ptr[T any](v T) *T { return &v }

// ProbeTable renders a probe's result as loadgen's tables do.
func ProbeTable(rate float64, r ProbeResult) string {
	ms := func(s Summary) string {
		f := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/1e6) }
		return f(s.P50) + "/" + f(s.P90) + "/" + f(s.P99) + "/" + f(s.Max)
	}
	return fmt.Sprintf("probe at %.0f/s, %d records sent, %d consumed (ms p50/p90/p99/max):\n  produce, acks=all:   %s\n  produce to consume:  %s\n",
		rate, r.Sent, r.Received, ms(r.Produce), ms(r.EndToEnd))
}
