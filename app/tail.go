package app

import (
	"context"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
)

// Tail reads topics without a consumer group, from their ends (or their
// starts when fromStart), and calls fn for every record until ctx ends.
// It commits nothing and affects no participant: it is how the live page
// and `prozess orders tail` watch the saga.
func Tail(ctx context.Context, brokers []string, topics []string, fromStart bool, fn func(*kgo.Record)) error {
	at := kgo.NewOffset().AtEnd()
	if fromStart {
		at = kgo.NewOffset().AtStart()
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topics...), kgo.ConsumeResetOffset(at),
		kgo.FetchMaxWait(500*time.Millisecond))
	if err != nil {
		return fmt.Errorf("creating tail client: %w", err)
	}
	defer cl.Close()
	for {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil || fs.IsClientClosed() {
			return nil
		}
		// Fetch errors are retried by the client; a topic that does not
		// exist yet is not worth stopping for.
		fs.EachRecord(fn)
	}
}

// addLiveFeed tails the saga topic and its dead letters into the api's live
// streams. Every api process tails for itself: its streams see every event
// whichever process's participants handled it. The Kafka client rides out
// broker outages itself; Tail fails only on a client it cannot create.
func (s *System) addLiveFeed(a *api.API) {
	topic, dlq := s.cfg.Topic, s.cfg.DLQTopic()
	s.addActor(func(ctx context.Context) error {
		return Tail(ctx, s.brokers, []string{topic, dlq}, false, func(r *kgo.Record) {
			if !a.Watched() {
				return // nobody to tell: not even decoded
			}
			if r.Topic == dlq {
				d := toDeadLetter(r)
				a.PublishDeadLetter(api.LiveDeadLetter{Partition: d.Partition, Offset: d.Offset, Participant: d.Participant,
					Reason: d.Reason, Type: d.Type, OrderID: d.Key, Time: d.At()})
				return
			}
			if ev, err := event.FromRecord(r); err == nil {
				a.Publish(ctx, ev)
			}
		})
	})
}
