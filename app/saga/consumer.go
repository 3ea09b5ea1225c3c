// Package saga is the runtime every participant runs on: the exactly-once
// consumer loop (inbox, one transaction per batch, offsets after commit,
// dead letters, fault points), the outbox relay, the embedded broker and the
// topics. A participant gives it a Handler; app/ wires it to the clients.
package saga

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/retry"
)

// Handler is what a saga participant gives the consumer loop.
type Handler interface {
	// Handles reports whether the participant acts on events of type t;
	// other records are skipped without touching the database.
	Handles(t event.Type) bool
	// Handle applies a batch of new events, in topic order and with
	// duplicates already removed, inside tx and returns the events they
	// emit. Handling a batch with set-based SQL (a few statements per batch,
	// not per event) is what lets one commit carry many orders. An
	// *event.Rejected error dead-letters that one event's record; any other
	// error is transient and the batch is retried.
	Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error)
}

// afterCommitter is implemented by participants with work that must follow
// a committed batch outside the database (the status cache). It is given
// every event of the batch it handles, duplicates the inbox skipped
// included: a crash between the commit and this call is healed when the
// batch is delivered again, so the work must be idempotent.
type afterCommitter interface {
	AfterCommit(ctx context.Context, evs []event.Event)
}

// Fault points where a test can crash a participant at the worst moments.
const (
	FaultAfterDBCommit = "after-db-commit" // effects committed, offsets not
	FaultBeforeCommit  = "before-db-commit"
	// The relay's: outbox rows read, not yet published; published, not yet
	// deleted (so they will be published again).
	FaultRelayBeforePublish = "before-publish"
	FaultRelayAfterPublish  = "after-publish"
	// Inside the transaction that deletes published rows, before commit.
	FaultRelayInSettle = "in-settle"
)

// FaultFunc is called at each fault point; a non-nil error makes the
// consumer stop at once, as a crash would, without committing offsets.
type FaultFunc func(participant, point string) error

// Consumer runs one participant: poll a batch, apply it in one PostgreSQL
// transaction (inbox dedup, effects, outbox), commit, then commit offsets.
type Consumer struct {
	name         string
	group        string
	kafka        Conn
	log          *slog.Logger
	client       *kgo.Client
	pool         *pgxpool.Pool
	handler      Handler
	topic        string
	dlqTopic     string
	maxBatch     int
	fault        FaultFunc
	poisonAfter  time.Duration
	stats        ConsumerStats
	metrics      *telemetry.Metrics
	tracer       *telemetry.ParticipantTracer
	onDeadLetter func(ctx context.Context, orders []uuid.UUID)
	committed    func()
	applied      map[string]map[int32]kgo.EpochOffset // the last applied batch's offsets (Run's goroutine only)
}

// ConsumerStats counts what a consumer did with the records it polled.
type ConsumerStats struct {
	Applied      atomic.Int64 // events whose effect was applied
	Duplicates   atomic.Int64 // events skipped by the inbox
	DeadLettered atomic.Int64 // records sent to the dead-letter topic
	Batches      atomic.Int64 // transactions committed
}

// ConsumerConfig holds what NewConsumer needs beyond the handler.
type ConsumerConfig struct {
	Kafka Conn
	// Group is the consumer group; empty means GroupName(participant).
	Group string
	// InstanceID, when set, makes the consumer a static member of its
	// group (KIP-345): a restart within the session timeout gets its
	// partitions back without a rebalance, so a rolling restart of
	// participants moves no partition.
	InstanceID string
	// ResetOutOfRange lets the consumer skip to the log start when its
	// committed offset is no longer on the topic. By default it stops
	// instead: those records were deleted by retention unread, and only an
	// operator may decide to go on without them.
	ResetOutOfRange bool
	// PoisonAfter bounds how long one record, alone, may keep failing
	// with an error that is neither transient nor its own fault before it
	// is dead-lettered with that error (0: one minute).
	PoisonAfter time.Duration
	Topic       string
	DLQTopic    string
	MaxBatch    int
	Fault       FaultFunc
	// KafkaLog, when set, receives the Kafka client's own log (group
	// membership, fetches) for debugging.
	KafkaLog kgo.Logger
	// Metrics, when set, gets batch sizes, durations and retries, and the
	// Kafka client's own metrics.
	Metrics *telemetry.Metrics
	// Tracing, when set, traces every record through the participant.
	Tracing *telemetry.Tracing
	// OnDeadLetter, when set, is told the orders of records dead-lettered
	// in a committed batch (the wiring makes the status cache send their
	// readers to PostgreSQL, which shows the dead letter).
	OnDeadLetter func(ctx context.Context, orders []uuid.UUID)
	// OutboxCommitted, when set, is called after a batch that wrote to
	// the outbox has committed (OutboxSignal.Committed wakes the relay).
	OutboxCommitted func()
}

// NewConsumer creates the Kafka client for participant name, in consumer
// group prozess-<name>, with manual offset commits.
func NewConsumer(name string, log *slog.Logger, pool *pgxpool.Pool, h Handler, cfg ConsumerConfig) (*Consumer, error) {
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 500
	}
	if cfg.Group == "" {
		cfg.Group = GroupName(name)
	}
	if cfg.PoisonAfter <= 0 {
		cfg.PoisonAfter = time.Minute
	}
	// A new group starts at the beginning either way; NoResetOffset only
	// turns an out-of-range committed offset into an error instead of a
	// silent jump (see Run).
	reset := kgo.NoResetOffset().AtStart()
	if cfg.ResetOutOfRange {
		reset = kgo.NewOffset().AtStart()
	}
	opts := cfg.Kafka.Opts(
		kgo.ClientID("prozess-"+name),
		kgo.ConsumerGroup(cfg.Group),
		kgo.ConsumeTopics(cfg.Topic),
		kgo.ConsumeResetOffset(reset),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.FetchMaxWait(time.Second),
		// A crashed member holds its partitions until its session times
		// out; Kafka's 45s default would stall the saga that long.
		kgo.SessionTimeout(10*time.Second),
		kgo.HeartbeatInterval(time.Second),
		// No commit on revoke: with BlockRebalanceOnPoll a rebalance only
		// runs between batches, when every applied batch is committed; what
		// is still uncommitted then is a batch that failed, and committing it
		// would skip records never applied.
	)
	if cfg.InstanceID != "" {
		opts = append(opts, kgo.InstanceID(cfg.InstanceID))
	}
	if cfg.KafkaLog != nil {
		opts = append(opts, kgo.WithLogger(cfg.KafkaLog))
	}
	opts = append(opts, cfg.Metrics.KafkaHooks()...)
	client, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("creating %s kafka client: %w", name, err)
	}
	return &Consumer{name: name, group: cfg.Group, kafka: cfg.Kafka, log: log, client: client, pool: pool, handler: h,
		topic: cfg.Topic, dlqTopic: cfg.DLQTopic, maxBatch: cfg.MaxBatch, fault: cfg.Fault, poisonAfter: cfg.PoisonAfter, metrics: cfg.Metrics, tracer: cfg.Tracing.ForParticipant(name, cfg.Group), onDeadLetter: cfg.OnDeadLetter, committed: cfg.OutboxCommitted}, nil
}

// GroupName is participant name's consumer group by default.
func GroupName(name string) string { return "prozess-" + name }

// Group is the consumer's group.
func (c *Consumer) Group() string { return c.group }

// Name is the participant the consumer runs.
func (c *Consumer) Name() string { return c.name }

// Stats returns the consumer's counters.
func (c *Consumer) Stats() *ConsumerStats { return &c.stats }

// Telemetry is what the metrics read of this consumer at scrape time.
func (c *Consumer) Telemetry() telemetry.Consumer {
	return telemetry.Consumer{Group: c.group, Counts: func() (int64, int64, int64) {
		return c.stats.Applied.Load(), c.stats.Duplicates.Load(), c.stats.DeadLettered.Load()
	}}
}

// Joined reports whether the consumer is a member of its group.
func (c *Consumer) Joined() bool {
	member, gen := c.client.GroupMetadata()
	return member != "" && gen > 0
}

// Generation is the group generation the consumer is a member of (0 when
// it is not).
func (c *Consumer) Generation() int32 {
	_, gen := c.client.GroupMetadata()
	return gen
}

// Close leaves the group and closes the client.
func (c *Consumer) Close() { c.client.Close() }

// Run consumes until ctx is cancelled. A batch in flight when that happens
// is finished and its offsets committed; a batch that cannot be applied is
// retried with capped backoff and never skipped.
func (c *Consumer) Run(ctx context.Context) error {
	for {
		fetches := c.client.PollRecords(ctx, c.maxBatch)
		if fetches.IsClientClosed() || ctx.Err() != nil {
			// Not UncommittedOffsets: this poll's records were never applied.
			c.commitApplied()
			c.client.AllowRebalance()
			return nil
		}
		lost := int32(-1)
		fetches.EachError(func(t string, p int32, err error) {
			if errors.Is(err, kerr.OffsetOutOfRange) {
				lost = p
				return
			}
			c.log.Warn("fetch failed", "topic", t, "partition", p, "err", err)
		})
		if lost >= 0 {
			c.client.AllowRebalance()
			return c.outOfRange(c.topic, lost)
		}
		recs := fetches.Records()
		if len(recs) == 0 {
			c.client.AllowRebalance()
			continue
		}
		start := time.Now()
		err := c.process(ctx, recs)
		c.metrics.ObserveBatch(c.name, len(recs), time.Since(start))
		if err != nil {
			if errors.Is(err, context.Canceled) {
				c.commitApplied() // the batches before this one
				c.client.AllowRebalance()
				return nil
			}
			c.client.AllowRebalance()
			return err
		}
		c.commitOffsets()
		c.client.AllowRebalance()
	}
}

// outOfRange is the error that stops a consumer whose committed offset on
// topic/partition is no longer on the topic: retention deleted records it
// never applied. It names the group, the partition and both offsets.
func (c *Consumer) outOfRange(topic string, partition int32) error {
	c.metrics.CountOutOfRange(c.name)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := c.kafka.Client()
	if err != nil {
		return fmt.Errorf("%s: consumer group %s, partition %s/%d: committed offset no longer on the topic (%v)", c.name, c.group, topic, partition, err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	committed, start := int64(-1), int64(-1)
	if offs, err := adm.FetchOffsets(ctx, c.group); err == nil {
		if o, ok := offs.Lookup(topic, partition); ok {
			committed = o.At
		}
	}
	if ls, err := adm.ListStartOffsets(ctx, topic); err == nil {
		if o, ok := ls.Lookup(topic, partition); ok {
			start = o.Offset
		}
	}
	return fmt.Errorf("%s: consumer group %s, partition %s/%d: committed offset %d is no longer on the topic (it now starts at %d): "+
		"retention deleted %d records this participant never applied; stopping rather than skipping them "+
		"(restart with --reset-out-of-range to go on from the oldest record deliberately)",
		c.name, c.group, topic, partition, committed, start, max(0, start-committed))
}

// commitOffsets commits what was just applied, without waiting for the
// broker: the next batch is polled and applied while the commit travels
// (franz-go keeps commits in order). The offsets still only ever follow
// the database commit; a commit that fails or is lost (a crash, a
// rebalance in between) only makes the records come again, and the inbox
// skips them. On Apache Kafka an offset commit waits for the offsets
// topic's replication, a round trip every hop used to wait for.
func (c *Consumer) commitOffsets() {
	offs := c.client.UncommittedOffsets() // exactly the batch just applied
	c.applied = offs
	c.client.CommitOffsets(context.Background(), offs, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
		if err == nil && resp != nil {
			for _, t := range resp.Topics {
				for _, p := range t.Partitions {
					if p.ErrorCode != 0 && err == nil {
						err = kerr.ErrorForCode(p.ErrorCode)
					}
				}
			}
		}
		if err != nil {
			c.log.Warn("committing offsets failed; records will be redelivered and skipped", "err", err)
		}
	})
}

// commitApplied commits the last applied batch's offsets and waits, when
// the consumer stops, so a clean restart redelivers nothing.
func (c *Consumer) commitApplied() {
	if c.applied == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c.client.CommitOffsetsSync(ctx, c.applied, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, _ *kmsg.OffsetCommitResponse, err error) {
		if err != nil {
			c.log.Warn("committing the last offsets at stop failed; those records will be redelivered and skipped", "err", err)
		}
	})
}

// process applies a batch, retrying transient failures. A record found
// poisonous is dead-lettered and the batch applied again without it.
func (c *Consumer) process(ctx context.Context, recs []*kgo.Record) (err error) {
	b := c.decode(recs)
	var end func(error)
	b.traces, end = c.tracer.HandleSpans(b.handled())
	defer func() { end(err) }()
	// Once started, a batch finishes even if shutdown begins: only waiting
	// between retries watches ctx.
	work := telemetry.WithOrderTraces(context.WithoutCancel(ctx), b.traces)
	for attempt := 0; ; attempt++ {
		err := c.apply(work, b)
		if err == nil {
			return nil
		}
		var p *poisonError
		if errors.As(err, &p) {
			c.markPoison(work, b, p.index, p.err)
			continue
		}
		var crash *crashError
		if errors.As(err, &crash) {
			return err
		}
		if classify(err) != transient {
			// Some record's fault, or an error of neither kind: find the
			// record by applying the batch one record at a time.
			return c.isolate(ctx, work, b)
		}
		c.metrics.CountRetry(c.name)
		c.log.Warn("batch failed, retrying", "records", len(recs), "attempt", attempt+1, "err", err)
		if err := retry.Wait(ctx, attempt); err != nil {
			return err
		}
	}
}

// isolate applies b one record at a time, in order, each in a transaction
// of its own, so a record at fault is dead-lettered alone and the others
// are applied: a permanent error at once, an error of neither kind once it
// has kept failing on that record alone for poisonAfter (while the
// database answers, so an outage never dead-letters anything). Transient
// errors are retried as ever.
func (c *Consumer) isolate(ctx, work context.Context, b *batch) error {
	for i := range b.recs {
		if b.skip[i] {
			continue
		}
		one := b.only(i)
		var since time.Time
		for attempt := 0; ; attempt++ {
			err := c.apply(work, one)
			if err == nil {
				break
			}
			var p *poisonError
			var crash *crashError
			switch {
			case errors.As(err, &p):
				c.markPoison(work, b, p.index, p.err)
				continue
			case errors.As(err, &crash):
				return err
			}
			switch kind := classify(err); {
			case kind == permanent:
				c.markPoison(work, b, i, err)
				continue
			case kind == unknown && since.IsZero():
				since = time.Now()
			case kind == unknown && time.Since(since) >= c.poisonAfter && c.pool.Ping(work) == nil:
				c.markPoison(work, b, i, fmt.Errorf("failed for %s with an error that is neither transient nor the record's: %w",
					c.poisonAfter, err))
				continue
			}
			c.metrics.CountRetry(c.name)
			c.log.Warn("record failed, retrying", "partition", b.recs[i].Partition, "offset", b.recs[i].Offset, "attempt", attempt+1, "err", err)
			if err := retry.Wait(ctx, attempt); err != nil {
				return err
			}
		}
	}
	return nil
}

// markPoison dead-letters record i at the next attempt.
func (c *Consumer) markPoison(ctx context.Context, b *batch, i int, err error) {
	b.poison[i] = err.Error()
	c.log.WarnContext(ctx, "dead-lettering record", "order_id", b.evs[i].OrderID, "partition", b.recs[i].Partition,
		"offset", b.recs[i].Offset, "reason", err)
}

// only is b with every record but i skipped; it shares b's poison map.
func (b *batch) only(i int) *batch {
	one := *b
	one.skip = make([]bool, len(b.skip))
	for j := range one.skip {
		one.skip[j] = j != i || b.skip[j]
	}
	return &one
}

type batch struct {
	recs   []*kgo.Record
	evs    []event.Event
	ids    []uuid.UUID                // inbox key per record
	skip   []bool                     // not handled by this participant
	replay []bool                     // put back by `prozess dlq replay`
	poison map[int]string             // record index -> reason
	traces map[string]context.Context // order id -> its handling span, when tracing
}

// decode reads every record once. Records the participant does not handle
// are skipped; undecodable ones it does handle are poison.
func (c *Consumer) decode(recs []*kgo.Record) *batch {
	b := &batch{recs: recs, evs: make([]event.Event, len(recs)), ids: make([]uuid.UUID, len(recs)),
		skip: make([]bool, len(recs)), replay: make([]bool, len(recs)), poison: map[int]string{}}
	for i, r := range recs {
		b.replay[i] = isReplay(r)
		if !c.handler.Handles(recordType(r)) {
			b.skip[i] = true
			continue
		}
		ev, err := event.FromRecord(r)
		if err != nil {
			b.poison[i] = err.Error()
			// A poison record has no trustworthy id; its position is its
			// identity, so a redelivery is dead-lettered only once.
			b.ids[i] = uuid.NewSHA1(uuid.NameSpaceURL, []byte(fmt.Sprintf("kafka:%s/%d/%d", r.Topic, r.Partition, r.Offset)))
			c.log.Warn("undecodable record", "partition", r.Partition, "offset", r.Offset, "err", err)
			continue
		}
		b.evs[i], b.ids[i] = ev, ev.ID
	}
	return b
}

// handled lists the records the participant handles, for their spans.
func (b *batch) handled() []telemetry.Handled {
	var hs []telemetry.Handled
	for i, r := range b.recs {
		if b.skip[i] {
			continue
		}
		h := telemetry.Handled{Record: r, Type: string(recordType(r))}
		if _, bad := b.poison[i]; !bad {
			h.OrderID = b.evs[i].OrderID.String()
		}
		hs = append(hs, h)
	}
	return hs
}

func recordType(r *kgo.Record) event.Type {
	for _, h := range r.Headers {
		if h.Key == "ce_type" {
			return event.Type(h.Value)
		}
	}
	return ""
}

type poisonError struct {
	index int
	err   error
}

func (e *poisonError) Error() string { return e.err.Error() }

type crashError struct{ point string }

func (e *crashError) Error() string { return "fault injected at " + e.point }

// apply is one attempt at a batch: one transaction for every record in it.
func (c *Consumer) apply(ctx context.Context, b *batch) error {
	var ids, replays []uuid.UUID
	for i := range b.recs {
		if !b.skip[i] {
			ids = append(ids, b.ids[i])
			if b.replay[i] {
				replays = append(replays, b.ids[i])
			}
		}
	}
	if len(ids) == 0 {
		return nil
	}
	tx, err := c.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("beginning transaction: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it is a no-op

	fresh, err := claim(ctx, tx, c.name, ids, replays)
	if err != nil {
		return err
	}
	var handled, batch []event.Event
	var dead []*kgo.Record
	var deadIDs, deadOrders []uuid.UUID
	var dups int
	index := map[uuid.UUID]int{} // event id -> record index, for rejections
	for i, r := range b.recs {
		if b.skip[i] {
			continue
		}
		if _, bad := b.poison[i]; !bad {
			handled = append(handled, b.evs[i])
		}
		if !fresh[b.ids[i]] {
			dups++
			continue
		}
		delete(fresh, b.ids[i]) // the same event twice in one batch: once
		if reason, bad := b.poison[i]; bad {
			// Kept in PostgreSQL too, byte-exact, for the order's readers
			// and an admin's re-drive; its id rides on the dead letter.
			row, err := c.keepDeadLetter(ctx, tx, reason, r)
			if err != nil {
				return err
			}
			dead = append(dead, c.deadLetter(r, reason, row))
			deadIDs = append(deadIDs, b.ids[i])
			if b.evs[i].OrderID != uuid.Nil {
				deadOrders = append(deadOrders, b.evs[i].OrderID)
			}
			continue
		}
		batch = append(batch, b.evs[i])
		index[b.evs[i].ID] = i
	}
	var emits []event.Event
	if len(batch) > 0 {
		emits, err = c.handler.Handle(ctx, tx, batch)
		var rej *event.Rejected
		if errors.As(err, &rej) {
			if i, ok := index[rej.ID]; ok {
				return &poisonError{index: i, err: rej.Err}
			}
		}
		if err != nil {
			return err
		}
	}
	applied := len(batch)
	eventTrace(emits, b.traces)
	if err := event.Emit(ctx, tx, c.topic, emits...); err != nil {
		return err
	}
	if err := event.WriteOutbox(ctx, tx, dead...); err != nil {
		return err
	}
	if len(deadIDs) > 0 {
		// Known, so a redelivery is skipped; not applied, so a replay
		// re-drives it (see claim).
		if _, err := tx.Exec(ctx, `UPDATE inbox SET dead = true WHERE consumer = $1 AND event_id = ANY($2)`, c.name, deadIDs); err != nil {
			return fmt.Errorf("marking dead-lettered records in the inbox: %w", err)
		}
	}
	if err := c.faultAt(FaultBeforeCommit); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("committing batch: %w", err)
	}
	if c.committed != nil && len(emits)+len(dead) > 0 {
		c.committed()
	}
	c.stats.Batches.Add(1)
	c.stats.Applied.Add(int64(applied))
	c.stats.Duplicates.Add(int64(dups))
	c.stats.DeadLettered.Add(int64(len(dead)))
	if err := c.faultAt(FaultAfterDBCommit); err != nil {
		return err
	}
	if len(deadOrders) > 0 && c.onDeadLetter != nil {
		c.onDeadLetter(ctx, deadOrders)
	}
	if ac, ok := c.handler.(afterCommitter); ok && len(handled) > 0 {
		ac.AfterCommit(ctx, handled)
	}
	c.observeSteps(batch, emits)
	return nil
}

// observeSteps times each saga step this batch took: from the event a
// participant answered to the event it emitted for the same order.
func (c *Consumer) observeSteps(in, out []event.Event) {
	if c.metrics == nil || len(out) == 0 {
		return
	}
	cause := make(map[uuid.UUID]event.Event, len(in))
	for _, e := range in {
		cause[e.OrderID] = e
	}
	for _, e := range out {
		if from, ok := cause[e.OrderID]; ok {
			c.metrics.ObserveStep(string(from.Type), string(e.Type), e.Time.Sub(from.Time))
		}
	}
}

func (c *Consumer) faultAt(point string) error {
	if c.fault == nil {
		return nil
	}
	if err := c.fault(c.name, point); err != nil {
		return &crashError{point: point}
	}
	return nil
}

// claim inserts the batch's event ids into the inbox and returns those not
// seen before: only they get an effect. A replayed record whose id this
// participant dead-lettered (and so never applied) is claimed again, once.
func claim(ctx context.Context, tx pgx.Tx, name string, ids, replays []uuid.UUID) (map[uuid.UUID]bool, error) {
	rows, err := tx.Query(ctx, `
		INSERT INTO inbox (consumer, event_id) SELECT $1, unnest($2::uuid[])
		ON CONFLICT DO NOTHING RETURNING event_id`, name, ids)
	if err != nil {
		return nil, fmt.Errorf("claiming inbox: %w", err)
	}
	fresh := make(map[uuid.UUID]bool, len(ids))
	var id uuid.UUID
	if _, err := pgx.ForEachRow(rows, []any{&id}, func() error { fresh[id] = true; return nil }); err != nil {
		return nil, fmt.Errorf("claiming inbox: %w", err)
	}
	if len(replays) > 0 {
		rows, err := tx.Query(ctx, `
			UPDATE inbox SET dead = false, processed_at = now()
			WHERE consumer = $1 AND event_id = ANY($2) AND dead RETURNING event_id`, name, replays)
		if err != nil {
			return nil, fmt.Errorf("claiming replayed records: %w", err)
		}
		if _, err := pgx.ForEachRow(rows, []any{&id}, func() error { fresh[id] = true; return nil }); err != nil {
			return nil, fmt.Errorf("claiming replayed records: %w", err)
		}
	}
	return fresh, nil
}

// keepDeadLetter records a dead letter in PostgreSQL (deadletter.Record)
// inside a savepoint: if a record is so odd that even that row is refused,
// it is still dead-lettered to the topic (row 0: no re-drive button, `dlq
// replay` still works), never left to stall its partition. A transient
// error fails the batch as any other would.
func (c *Consumer) keepDeadLetter(ctx context.Context, tx pgx.Tx, reason string, r *kgo.Record) (int64, error) {
	sp, err := tx.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("savepoint for a dead letter: %w", err)
	}
	row, err := deadletter.Record(ctx, sp, c.name, reason, r)
	if err == nil {
		return row, sp.Commit(ctx)
	}
	if rerr := sp.Rollback(ctx); rerr != nil {
		return 0, fmt.Errorf("%w (and rolling back to the savepoint: %v)", err, rerr)
	}
	if classify(err) == transient {
		return 0, err
	}
	c.log.WarnContext(ctx, "dead letter not kept in PostgreSQL, only on the dead-letter topic", "partition", r.Partition, "offset", r.Offset, "err", err)
	return 0, nil
}

func (c *Consumer) deadLetter(r *kgo.Record, reason string, row int64) *kgo.Record {
	hs := append([]kgo.RecordHeader(nil), r.Headers...)
	if row > 0 {
		hs = append(hs, kgo.RecordHeader{Key: deadletter.HeaderID, Value: []byte(strconv.FormatInt(row, 10))})
	}
	hs = append(hs,
		kgo.RecordHeader{Key: HeaderDLQReason, Value: []byte(reason)},
		kgo.RecordHeader{Key: HeaderDLQParticipant, Value: []byte(c.name)},
		kgo.RecordHeader{Key: HeaderDLQTopic, Value: []byte(r.Topic)},
		kgo.RecordHeader{Key: HeaderDLQPartition, Value: []byte(strconv.Itoa(int(r.Partition)))},
		kgo.RecordHeader{Key: HeaderDLQOffset, Value: []byte(strconv.FormatInt(r.Offset, 10))},
		kgo.RecordHeader{Key: HeaderDLQTime, Value: []byte(time.Now().UTC().Format(time.RFC3339Nano))},
	)
	return &kgo.Record{Topic: c.dlqTopic, Key: r.Key, Value: r.Value, Headers: hs}
}

// KafkaLogger passes the Kafka client's log to slog at level (empty: none).
func KafkaLogger(level string, log *slog.Logger) kgo.Logger {
	var l kgo.LogLevel
	switch level {
	case "":
		return nil
	case "error":
		l = kgo.LogLevelError
	case "warn":
		l = kgo.LogLevelWarn
	case "info":
		l = kgo.LogLevelInfo
	default:
		l = kgo.LogLevelDebug
	}
	return kgo.BasicLogger(slogWriter{log}, l, nil)
}

// slogWriter turns the Kafka client's log lines into slog records.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.log.Info("kafka", "msg", strings.TrimSpace(string(p)))
	return len(p), nil
}

// eventTrace sets, on each emitted event, the trace context of the span that
// handled its order.
func eventTrace(evs []event.Event, byOrder map[string]context.Context) {
	if len(byOrder) == 0 {
		return
	}
	for i := range evs {
		if ctx, ok := byOrder[evs[i].OrderID.String()]; ok {
			evs[i].Trace = event.TraceOf(ctx)
		}
	}
}
