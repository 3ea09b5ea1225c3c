package saga

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
)

// InboxRetention is how long inbox rows must be kept: as long as a
// redelivery can still bring their event back, which is the saga topic's
// retention.ms (read from the cluster) plus margin for consumers lagging
// behind it. It returns 0, keep forever, when the topic keeps its records
// forever (retention.ms -1).
func InboxRetention(ctx context.Context, conn Conn, topic string, margin time.Duration) (time.Duration, error) {
	cl, err := conn.Client()
	if err != nil {
		return 0, fmt.Errorf("creating kafka admin client: %w", err)
	}
	defer cl.Close()
	rcs, err := kadm.NewClient(cl).DescribeTopicConfigs(ctx, topic)
	if err != nil {
		return 0, fmt.Errorf("reading %s's retention: %w", topic, err)
	}
	rc, err := rcs.On(topic, nil)
	if err != nil {
		return 0, fmt.Errorf("reading %s's retention: %w", topic, err)
	}
	ms := int64(7 * 24 * time.Hour / time.Millisecond) // Kafka's default
	for _, c := range rc.Configs {
		if c.Key == "retention.ms" && c.Value != nil {
			if ms, err = strconv.ParseInt(*c.Value, 10, 64); err != nil {
				return 0, fmt.Errorf("%s's retention.ms %q: %w", topic, *c.Value, err)
			}
		}
	}
	if ms < 0 {
		return 0, nil
	}
	return time.Duration(ms)*time.Millisecond + margin, nil
}

// PruneInbox deletes inbox rows processed longer than retention ago, in
// batches, and returns how many it deleted. Retention 0 deletes nothing.
func PruneInbox(ctx context.Context, pool *pgxpool.Pool, retention time.Duration) (int64, error) {
	if retention <= 0 {
		return 0, nil
	}
	var total int64
	for {
		tag, err := pool.Exec(ctx, `
			DELETE FROM inbox WHERE ctid = ANY (ARRAY(
				SELECT ctid FROM inbox WHERE processed_at < now() - $1::interval LIMIT 10000))`,
			fmt.Sprintf("%d milliseconds", retention.Milliseconds()))
		if err != nil {
			return total, fmt.Errorf("pruning inbox: %w", err)
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < 10000 {
			return total, nil
		}
	}
}

// RunInboxPruner prunes the inbox every interval until ctx ends, reading
// the topic's retention each time (an operator may change it). Failures are
// logged and tried again next time: a late prune only costs disk.
func RunInboxPruner(ctx context.Context, pool *pgxpool.Pool, conn Conn, topic string, margin, interval time.Duration, log *slog.Logger) error {
	for {
		retention, err := InboxRetention(ctx, conn, topic, margin)
		if err == nil {
			var n int64
			if n, err = PruneInbox(ctx, pool, retention); n > 0 {
				log.Info("inbox pruned", "rows", n, "older_than", retention)
			}
		}
		if err != nil && ctx.Err() == nil {
			log.Warn("inbox not pruned", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}
