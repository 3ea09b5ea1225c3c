package saga

import (
	"context"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// ScanStall bounds how long ScanDeadLetters waits for the next records of
// a topic that has more: each wait is bounded, not the whole scan, which
// can take as long as the topic is large.
const ScanStall = 30 * time.Second

// ScanDeadLetters reads the dead-letter topic from its start to its end as
// of the call and hands fn the records in batches of at most batch, so a
// topic of any size is read in bounded memory. It stops at fn's first
// error.
func ScanDeadLetters(ctx context.Context, conn Conn, topic string, batch int, fn func([]DeadLetter) error) error {
	cl, err := conn.Client()
	if err != nil {
		return err
	}
	defer cl.Close()
	lctx, cancel := context.WithTimeout(ctx, ScanStall)
	defer cancel()
	adm := kadm.NewClient(cl)
	ends, err := adm.ListEndOffsets(lctx, topic)
	if err != nil {
		return fmt.Errorf("cannot reach Kafka at %v: %w", conn.Brokers, err)
	}
	starts, err := adm.ListStartOffsets(lctx, topic)
	if err != nil {
		return fmt.Errorf("cannot reach Kafka at %v: %w", conn.Brokers, err)
	}
	want := map[int32]int64{}
	parts := map[string]map[int32]kgo.Offset{topic: {}}
	ends.Each(func(o kadm.ListedOffset) {
		s, _ := starts.Lookup(o.Topic, o.Partition)
		if o.Offset > s.Offset {
			want[o.Partition] = o.Offset
			parts[topic][o.Partition] = kgo.NewOffset().At(s.Offset)
		}
	})
	if len(want) == 0 {
		return nil
	}
	reader, err := conn.Client(kgo.ConsumePartitions(parts), kgo.MaxConcurrentFetches(1), kgo.FetchMaxBytes(16<<20))
	if err != nil {
		return err
	}
	defer reader.Close()
	var out []DeadLetter
	for len(want) > 0 {
		pctx, cancel := context.WithTimeout(ctx, ScanStall)
		fs := reader.PollRecords(pctx, batch-len(out))
		cancel()
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("reading %s: %w", topic, err)
		}
		if fs.Empty() {
			return fmt.Errorf("reading %s: no records for %s, %d partitions unread to their end", topic, ScanStall, len(want))
		}
		fs.EachRecord(func(r *kgo.Record) {
			if end, ok := want[r.Partition]; ok {
				if r.Offset+1 >= end {
					delete(want, r.Partition)
				}
				if r.Offset < end {
					out = append(out, ParseDeadLetter(r))
				}
			}
		})
		if len(out) >= batch || len(want) == 0 {
			if len(out) > 0 {
				if err := fn(out); err != nil {
					return err
				}
			}
			out = nil
		}
	}
	return nil
}
