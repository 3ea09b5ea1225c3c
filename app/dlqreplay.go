package app

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/deadletter"
)

// replayBatch is how many dead letters `dlq replay` holds and publishes at
// a time: the topic is streamed, never read whole into memory.
const replayBatch = 500

// replayPublishTimeout bounds publishing one batch, not the whole replay.
const replayPublishTimeout = time.Minute

// replayDeadLetters streams the dead-letter topic and puts back on their
// topic the dead letters chosen (all, or the PARTITION@OFFSET names in
// chosen, which it empties as it finds them), batch by batch, marking each
// batch replayed in PostgreSQL before the next. Dead letters already
// replayed (or re-driven) are skipped: one that failed again is a newer
// dead letter, and replaying the old one too would dead-letter it once
// more on every run.
func (c *Config) replayDeadLetters(ctx context.Context, out io.Writer, all bool, chosen map[string]bool) error {
	kafka, retention, err := c.inboxRetention(ctx)
	if err != nil {
		return err
	}
	cl, err := kafka.Client()
	if err != nil {
		return err
	}
	defer cl.Close()
	var pool *pgxpool.Pool // opened for the first dead letter with a row
	defer func() {
		if pool != nil {
			pool.Close()
		}
	}()
	replayed, skipped := 0, 0
	err = saga.ScanDeadLetters(ctx, kafka, c.DLQTopic(), replayBatch, func(dls []saga.DeadLetter) error {
		var ids []int64
		for _, d := range dls {
			if d.ID > 0 {
				ids = append(ids, d.ID)
			}
		}
		done := map[int64]time.Time{}
		if len(ids) > 0 && pool == nil {
			if _, pool, err = c.openDB(ctx); err != nil {
				return fmt.Errorf("opening the database, to skip dead letters already replayed: %w", err)
			}
		}
		if len(ids) > 0 {
			if done, err = deadletter.Replayed(ctx, pool, ids); err != nil {
				return err
			}
		}
		var recs []*kgo.Record
		var rows []int64
		for _, d := range dls {
			name := fmt.Sprintf("%d@%d", d.Partition, d.Offset)
			if !all && !chosen[name] {
				continue
			}
			delete(chosen, name)
			if at, ok := done[d.ID]; ok {
				if !all {
					return fmt.Errorf("dead letter %s was replayed at %s; if it failed again, that is a newer dead letter (dlq list)",
						name, at.UTC().Format(time.RFC3339))
				}
				skipped++
				continue
			}
			if d.Headers[saga.HeaderDLQTopic] == "" {
				return fmt.Errorf("dead letter %s has no %s header; not replaying it", name, saga.HeaderDLQTopic)
			}
			if err := deadletter.TooOld(d.Age(), retention, c.Topic); err != nil {
				return fmt.Errorf("dead letter %s is %w; not replaying it", name, err)
			}
			recs = append(recs, d.Original())
			if d.ID > 0 {
				rows = append(rows, d.ID)
			}
		}
		if len(recs) == 0 {
			return nil
		}
		pctx, cancel := context.WithTimeout(ctx, replayPublishTimeout)
		defer cancel()
		if err := cl.ProduceSync(pctx, recs...).FirstErr(); err != nil {
			return fmt.Errorf("replaying %d records: %w", len(recs), err)
		}
		replayed += len(recs)
		// The orders' readers see them replayed (and their trails say so),
		// as after a re-drive from the live page; the next run skips them.
		if len(rows) > 0 {
			if err := deadletter.MarkReplayed(ctx, pool, rows, "prozess dlq replay"); err != nil {
				return fmt.Errorf("replayed, but not marked replayed in PostgreSQL (orders still show them open): %w", err)
			}
		}
		return nil
	})
	if err != nil {
		if replayed > 0 {
			return fmt.Errorf("after replaying %d records: %w", replayed, err)
		}
		return err
	}
	for name := range chosen {
		return fmt.Errorf("--record %s: no such dead letter in %s", name, c.DLQTopic())
	}
	if skipped > 0 {
		fmt.Fprintf(out, "skipped %d dead letters already replayed\n", skipped)
	}
	if replayed == 0 {
		fmt.Fprintln(out, "nothing to replay")
		return nil
	}
	fmt.Fprintf(out, "replayed %d records\n", replayed)
	return nil
}

// inboxRetention is how long the inboxes remember event ids (a replay of
// an older event is refused: deadletter.TooOld), read from the saga
// topic's config through the command's Kafka connection, which it returns.
func (c *Config) inboxRetention(ctx context.Context) (saga.Conn, time.Duration, error) {
	kafka, err := c.kafka()
	if err != nil {
		return saga.Conn{}, 0, err
	}
	retention, err := saga.InboxRetention(ctx, kafka, c.Topic, c.InboxMargin)
	return kafka, retention, err
}
