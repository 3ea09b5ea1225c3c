package saga

import (
	"context"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Tail reads topics without a consumer group, from their ends (or their
// starts when fromStart), and calls fn for every record until ctx ends.
// It commits nothing and affects no participant: it is how the live page
// and `prozess orders tail` watch the saga.
func Tail(ctx context.Context, conn Conn, topics []string, fromStart bool, fn func(*kgo.Record)) error {
	at := kgo.NewOffset().AtEnd()
	if fromStart {
		at = kgo.NewOffset().AtStart()
	}
	cl, err := conn.Client(kgo.ConsumeTopics(topics...), kgo.ConsumeResetOffset(at),
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
