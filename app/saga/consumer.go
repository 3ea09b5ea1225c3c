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
	"sync"
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
	client       atomic.Pointer[kgo.Client] // replaced when the consumer rejoins after giving up
	opts         []kgo.Opt                  // to make that new client
	closed       atomic.Bool
	pool         *pgxpool.Pool
	handler      Handler
	topic        string
	dlqTopic     string
	maxBatch     int
	fault        FaultFunc
	poisonAfter  time.Duration
	giveUpAfter  time.Duration
	stats        ConsumerStats
	metrics      *telemetry.Metrics
	tracer       *telemetry.ParticipantTracer
	onDeadLetter func(ctx context.Context, orders []uuid.UUID)
	committed    func()
	own          ownership
	progress     atomic.Int64 // unix nanoseconds of the last sign that PostgreSQL answers
}

// ConsumerStats counts what a consumer did with the records it polled.
type ConsumerStats struct {
	Applied      atomic.Int64 // events whose effect was applied
	Duplicates   atomic.Int64 // events skipped by the inbox
	DeadLettered atomic.Int64 // records sent to the dead-letter topic
	Batches      atomic.Int64 // transactions committed
	// DeadLetterFailures counts attempts at dead-lettering a record that
	// failed themselves (the outbox or inbox refused the dead letter).
	DeadLetterFailures atomic.Int64
	GaveUp             atomic.Int64 // times the consumer left its group, its database unreachable
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
	// GiveUpAfter bounds how long the consumer keeps its partitions while
	// PostgreSQL does not answer (0: 15 seconds). Past it the consumer
	// leaves its group, so another instance of the participant takes the
	// partitions over, and rejoins once PostgreSQL answers a ping again.
	// (A static member, InstanceID set, cannot leave: its partitions move
	// when its session times out.)
	GiveUpAfter time.Duration
	// SessionTimeout is the group session: a member silent this long
	// loses its partitions (0: 10 seconds). A static member (InstanceID)
	// keeps them across a restart shorter than this, so give it longer
	// than a restart takes.
	SessionTimeout time.Duration
	Topic          string
	DLQTopic       string
	MaxBatch       int
	Fault          FaultFunc
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
	if cfg.GiveUpAfter <= 0 {
		cfg.GiveUpAfter = 15 * time.Second
	}
	if cfg.SessionTimeout <= 0 {
		cfg.SessionTimeout = 10 * time.Second
	}
	c := &Consumer{name: name, group: cfg.Group, kafka: cfg.Kafka, log: log, pool: pool, handler: h,
		topic: cfg.Topic, dlqTopic: cfg.DLQTopic, maxBatch: cfg.MaxBatch, fault: cfg.Fault, poisonAfter: cfg.PoisonAfter,
		giveUpAfter: cfg.GiveUpAfter, metrics: cfg.Metrics, tracer: cfg.Tracing.ForParticipant(name, cfg.Group),
		onDeadLetter: cfg.OnDeadLetter, committed: cfg.OutboxCommitted}
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
		kgo.SessionTimeout(cfg.SessionTimeout),
		kgo.HeartbeatInterval(time.Second),
		// No commit on revoke: with BlockRebalanceOnPoll a rebalance only
		// runs between batches, when every applied batch is committed; what
		// is still uncommitted then is a batch that failed, and committing it
		// would skip records never applied.
		//
		// Partitions taken away are forgotten at once: their offsets are
		// never committed again by this member (that could rewind what
		// the new owner committed since), and records held back for them
		// are dropped, so the new owner applies them.
		kgo.OnPartitionsRevoked(func(_ context.Context, _ *kgo.Client, lost map[string][]int32) { c.own.lose(lost) }),
		kgo.OnPartitionsLost(func(_ context.Context, _ *kgo.Client, lost map[string][]int32) { c.own.lose(lost) }),
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
	c.opts = opts
	c.client.Store(client)
	return c, nil
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
	member, gen := c.client.Load().GroupMetadata()
	return member != "" && gen > 0
}

// Generation is the group generation the consumer is a member of (0 when
// it is not).
func (c *Consumer) Generation() int32 {
	_, gen := c.client.Load().GroupMetadata()
	return gen
}

// Close leaves the group and closes the client.
func (c *Consumer) Close() {
	c.closed.Store(true)
	c.client.Load().Close()
}

// Run consumes until ctx is cancelled. A round in flight when that happens
// is finished and its offsets committed; a record that cannot be applied is
// retried with capped backoff and never skipped.
//
// Work is independent per partition: a record that keeps failing holds back
// its own partition (paused, its records kept in memory) while the others
// go on, and a round (one poll, one attempt) never keeps a rebalance waiting
// for longer than one attempt, or isolateBudget when a batch is taken apart.
// When PostgreSQL has not answered for giveUpAfter the consumer gives its
// partitions up (see giveUp).
func (c *Consumer) Run(ctx context.Context) error {
	for {
		err := c.member(ctx)
		if !errors.Is(err, errGaveUp) {
			return err
		}
		if err := c.rejoin(ctx); err != nil {
			if ctx.Err() != nil || c.closed.Load() {
				return nil // stopped while waiting for PostgreSQL
			}
			return err
		}
	}
}

// errGaveUp ends a membership: PostgreSQL did not answer for giveUpAfter.
var errGaveUp = errors.New("database unreachable")

// isolateBudget bounds how long one round may take a failed batch apart
// record by record before it lets a pending rebalance run: far below the
// group's rebalance timeout (60s), so a member is never evicted for it.
const isolateBudget = 15 * time.Second

// held is one partition's records not yet applied, from the one that
// failed on, kept in memory (the partition paused) until retried.
type held struct {
	recs    []*kgo.Record
	attempt int       // failed rounds at recs[0]
	due     time.Time // when to try again
	since   time.Time // recs[0]'s first unclassified failure (zero: none)
}

// member consumes as one member of the group, with the current client,
// until ctx ends (nil) or PostgreSQL stays unreachable (errGaveUp).
func (c *Consumer) member(ctx context.Context) error {
	cl := c.client.Load()
	// work is what a round runs under: not cancelled by shutdown (a round
	// once started finishes), only by giving up.
	work, giveUp := context.WithCancel(context.WithoutCancel(ctx))
	defer giveUp()
	c.progress.Store(time.Now().UnixNano())
	go c.watch(work, giveUp)
	holds := map[int32]*held{}
	commits := c.startCommitter(cl)
	defer commits.halt()
	stop := func() {
		commits.halt()
		c.commitApplied(cl)
		cl.AllowRebalance()
	}
	for {
		c.forgetLost(cl, holds)
		if work.Err() != nil {
			commits.halt()
			c.giveUp(cl)
			return errGaveUp
		}
		pollCtx, cancel := context.WithCancel(ctx)
		if len(holds) > 0 {
			pollCtx, cancel = context.WithDeadline(ctx, nextDue(holds))
		}
		unwatch := context.AfterFunc(work, cancel)
		fetches := cl.PollRecords(pollCtx, c.maxBatch)
		unwatch()
		cancel()
		if fetches.IsClientClosed() || ctx.Err() != nil {
			// Not UncommittedOffsets: this poll's records were never applied.
			stop()
			return nil
		}
		// A revoke or loss can run while the poll waits (from here to
		// AllowRebalance none can): what is held for those partitions
		// must not be applied now, or its offsets would be committed
		// again over the new owner's.
		c.forgetLost(cl, holds)
		lost := int32(-1)
		fetches.EachError(func(t string, p int32, err error) {
			switch {
			case errors.Is(err, kerr.OffsetOutOfRange):
				lost = p
			case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
				// The poll's own deadline: time to retry what is held.
			default:
				c.log.Warn("fetch failed", "topic", t, "partition", p, "err", err)
			}
		})
		if lost >= 0 {
			cl.AllowRebalance()
			return c.outOfRange(c.topic, lost)
		}
		var ready []*kgo.Record
		for _, r := range fetches.Records() {
			if h := holds[r.Partition]; h != nil {
				h.recs = append(h.recs, r) // fetched before the pause took
			} else {
				ready = append(ready, r)
			}
		}
		now := time.Now()
		for _, h := range holds {
			if !now.Before(h.due) {
				ready = append(ready, h.recs...)
			}
		}
		if len(ready) == 0 {
			cl.AllowRebalance()
			continue
		}
		start := time.Now()
		err := c.process(ctx, work, ready, holds)
		c.metrics.ObserveBatch(c.name, len(ready), time.Since(start))
		if err != nil && !errors.Is(err, errGaveUp) {
			cl.AllowRebalance()
			return err
		}
		commits.wake()
		c.pause(cl, holds)
		if ctx.Err() != nil {
			stop()
			return nil
		}
		cl.AllowRebalance()
	}
}

// nextDue is when the first held partition is due for a retry.
func nextDue(holds map[int32]*held) time.Time {
	var next time.Time
	for _, h := range holds {
		if next.IsZero() || h.due.Before(next) {
			next = h.due
		}
	}
	return next
}

// pause stops fetching the held partitions and resumes the others.
func (c *Consumer) pause(cl *kgo.Client, holds map[int32]*held) {
	var stuck, free []int32
	for _, p := range cl.PauseFetchPartitions(nil)[c.topic] {
		if holds[p] == nil {
			free = append(free, p)
		}
	}
	for p := range holds {
		stuck = append(stuck, p)
	}
	if len(free) > 0 {
		cl.ResumeFetchPartitions(map[string][]int32{c.topic: free})
	}
	if len(stuck) > 0 {
		cl.PauseFetchPartitions(map[string][]int32{c.topic: stuck})
	}
}

// forgetLost drops what is held for partitions revoked or lost since the
// last round: uncommitted, they come to their new owner (or back to this
// member, from the committed offset).
func (c *Consumer) forgetLost(cl *kgo.Client, holds map[int32]*held) {
	lost := c.own.takeLost()
	var resume []int32
	for _, p := range lost {
		if holds[p] != nil {
			c.log.Info("partition taken away while held; its records go to the next owner", "partition", p, "offset", holds[p].recs[0].Offset)
			delete(holds, p)
		}
		resume = append(resume, p)
	}
	if len(resume) > 0 {
		cl.ResumeFetchPartitions(map[string][]int32{c.topic: resume})
	}
}

// watch gives up (cancels work) once PostgreSQL has shown no sign of life
// for giveUpAfter: no committed round and no answered ping. It pings only
// when rounds have not shown that for a while.
func (c *Consumer) watch(work context.Context, giveUp context.CancelFunc) {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-work.Done():
			return
		case <-tick.C:
		}
		quiet := time.Since(time.Unix(0, c.progress.Load()))
		if quiet < 2*time.Second {
			continue
		}
		ctx, cancel := context.WithTimeout(work, 2*time.Second)
		err := c.pool.Ping(ctx)
		cancel()
		if err == nil {
			c.alive()
			continue
		}
		if quiet := time.Since(time.Unix(0, c.progress.Load())); quiet >= c.giveUpAfter && work.Err() == nil {
			c.log.Error("PostgreSQL unreachable; giving this member's partitions up to another instance", "for", quiet.Round(time.Second), "err", err)
			giveUp()
			return
		}
	}
}

// alive notes that PostgreSQL answered.
func (c *Consumer) alive() { c.progress.Store(time.Now().UnixNano()) }

// giveUp commits what was applied and leaves the group (closing the
// client), so the group hands this member's partitions to another
// instance of the participant instead of waiting for PostgreSQL here.
func (c *Consumer) giveUp(cl *kgo.Client) {
	c.stats.GaveUp.Add(1)
	c.commitApplied(cl)
	cl.AllowRebalance()
	cl.Close()
	c.own.reset()
}

// rejoin waits until PostgreSQL answers a ping, then makes a new client,
// which joins the group again.
func (c *Consumer) rejoin(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		if c.closed.Load() {
			return errors.New("closed")
		}
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := c.pool.Ping(pctx)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err := retry.Wait(ctx, attempt); err != nil {
			return err
		}
	}
	cl, err := kgo.NewClient(c.opts...)
	if err != nil {
		return fmt.Errorf("creating %s kafka client: %w", c.name, err)
	}
	c.client.Store(cl)
	if c.closed.Load() { // Close ran meanwhile and closed the old client
		cl.Close()
		return errors.New("closed")
	}
	c.log.Info("PostgreSQL answers again; rejoining the consumer group")
	return nil
}

// ownership is what the rebalance callbacks share with Run: the next
// offset to commit for each partition still owned, and the partitions lost
// since Run last looked.
type ownership struct {
	mu      sync.Mutex
	applied map[int32]kgo.EpochOffset
	lost    []int32
}

// lose forgets partitions revoked or lost.
func (o *ownership) lose(m map[string][]int32) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, ps := range m {
		for _, p := range ps {
			delete(o.applied, p)
			o.lost = append(o.lost, p)
		}
	}
}

func (o *ownership) takeLost() []int32 {
	o.mu.Lock()
	defer o.mu.Unlock()
	lost := o.lost
	o.lost = nil
	return lost
}

// done notes r applied (or skipped, or dead-lettered).
func (o *ownership) done(r *kgo.Record) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.applied == nil {
		o.applied = map[int32]kgo.EpochOffset{}
	}
	if cur, ok := o.applied[r.Partition]; !ok || cur.Offset <= r.Offset {
		o.applied[r.Partition] = kgo.EpochOffset{Epoch: r.LeaderEpoch, Offset: r.Offset + 1}
	}
}

// offsets is what to commit: every owned partition's next offset.
func (o *ownership) offsets(topic string) map[string]map[int32]kgo.EpochOffset {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.applied) == 0 {
		return nil
	}
	ps := make(map[int32]kgo.EpochOffset, len(o.applied))
	for p, eo := range o.applied {
		ps[p] = eo
	}
	return map[string]map[int32]kgo.EpochOffset{topic: ps}
}

func (o *ownership) reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.applied, o.lost = nil, nil
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

// committer commits what was applied, without the member loop waiting for
// the broker: the next batch is polled and applied while the commit
// travels. The offsets still only ever follow the database commit, and name
// only partitions this member still owns; a commit that fails or is lost (a
// crash, a rebalance in between) only makes the records come again, and the
// inbox skips them. On Apache Kafka an offset commit waits for the offsets
// topic's replication, a round trip every hop used to wait for.
//
// One commit is in flight at a time, and the next one carries the newest
// offsets, however many batches were applied meanwhile. A commit per batch
// used to be queued behind the one in flight, and franz-go lets no member
// join or rejoin its group while a commit is queued: with a group
// coordinator that did not answer for a while (SIGSTOPped, restarting), a
// member queued thousands, and once the coordinator answered again, its
// rejoin waited for all of them to drain, one round trip each. The fault
// suite saw orders stuck for 50 s on Apache Kafka after a coordinator was
// frozen and resumed (TestSlowOffsetCommitsHoldNoRebalance).
type committer struct {
	c       *Consumer
	cl      *kgo.Client
	pending chan struct{} // one slot: a batch was applied since the last commit began
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}
	once    sync.Once
}

// startCommitter starts committing for cl until halt.
func (c *Consumer) startCommitter(cl *kgo.Client) *committer {
	ctx, cancel := context.WithCancel(context.Background())
	k := &committer{c: c, cl: cl, pending: make(chan struct{}, 1), ctx: ctx, cancel: cancel, done: make(chan struct{})}
	go k.run()
	return k
}

// wake asks for a commit of the offsets applied so far; it never blocks.
func (k *committer) wake() {
	select {
	case k.pending <- struct{}{}:
	default: // one is due already and will read the newest offsets
	}
}

// halt stops committing and waits for the goroutine; a commit in flight is
// cancelled (commitApplied, which follows at a stop, sends the last
// offsets and waits for them).
func (k *committer) halt() {
	k.once.Do(func() {
		k.cancel()
		<-k.done
	})
}

// commitRetry is how long a failed commit waits before it is tried again
// with the newest offsets, so that the last batch's offsets reach the broker
// even when no batch follows (a commit dropped at a rebalance, a coordinator
// that answered with an error).
const commitRetry = time.Second

func (k *committer) run() {
	defer close(k.done)
	for {
		select {
		case <-k.ctx.Done():
			return
		case <-k.pending:
		}
		if err := k.c.commitOffsets(k.ctx, k.cl); err != nil {
			t := time.NewTimer(commitRetry)
			select {
			case <-k.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			k.wake()
		}
	}
}

// commitOffsets commits the applied offsets and waits for the answer.
func (c *Consumer) commitOffsets(ctx context.Context, cl *kgo.Client) (failed error) {
	// The generation is read before the offsets: a rebalance in between
	// makes the commit go nowhere rather than out in the new generation.
	commitCtx := commitContext(ctx, cl)
	offs := c.own.offsets(c.topic)
	if offs == nil {
		return nil
	}
	answered := make(chan struct{})
	cl.CommitOffsets(commitCtx, offs, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
		defer close(answered)
		defer func() { failed = err }()
		if err == nil && resp != nil {
			for _, t := range resp.Topics {
				for _, p := range t.Partitions {
					if p.ErrorCode != 0 && err == nil {
						err = kerr.ErrorForCode(p.ErrorCode)
					}
				}
			}
		}
		if err != nil && ctx.Err() == nil {
			c.log.Warn("committing offsets failed; retrying with the newest offsets (until then, a restart redelivers those records and the inbox skips them)", "err", err, "retry_in", commitRetry)
		}
	})
	<-answered
	return failed
}

// commitContext makes a commit go out only in the group generation its
// offsets were worked out in. franz-go holds a commit made while the member
// rejoins its group and sends it, afterwards, with the new generation. If
// the member lost its partitions meanwhile (a broker that forgot the
// group, a session that expired: no revoke is seen) and got them back
// after another member advanced them, the held commit would rewind that
// member's progress; the fault suite saw it after broker restarts. Dropped,
// it only makes records come again, which the inbox skips.
func commitContext(ctx context.Context, cl *kgo.Client) context.Context {
	_, gen := cl.GroupMetadata()
	return kgo.PreCommitFnContext(ctx, func(req *kmsg.OffsetCommitRequest) error {
		if req.Generation != gen {
			return fmt.Errorf("offsets of group generation %d not committed in generation %d (the member rejoined in between)", gen, req.Generation)
		}
		return nil
	})
}

// commitApplied commits the applied offsets of the partitions still owned
// and waits, when the consumer stops, so a clean restart redelivers
// nothing. A partition revoked since is left alone: its new owner may have
// committed further.
func (c *Consumer) commitApplied(cl *kgo.Client) {
	offs := c.own.offsets(c.topic)
	if offs == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl.CommitOffsetsSync(commitContext(ctx, cl), offs, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, _ *kmsg.OffsetCommitResponse, err error) {
		if err != nil {
			c.log.Warn("committing the last offsets at stop failed; those records will be redelivered and skipped", "err", err)
		}
	})
}

// process is one round's attempt at recs (one transaction for them all): a
// record found poisonous is dead-lettered and the rest applied again
// without it. What cannot be applied now is held back in holds, per
// partition, to be retried after a backoff; the partitions applied leave
// holds. It returns an error only for a crash (a fault point) or errGaveUp.
func (c *Consumer) process(ctx, work context.Context, recs []*kgo.Record, holds map[int32]*held) (err error) {
	b := c.decode(recs)
	var end func(error)
	b.traces, end = c.tracer.HandleSpans(b.handled())
	defer func() { end(err) }()
	traced := telemetry.WithOrderTraces(work, b.traces)
	for {
		err := c.apply(traced, b)
		if err == nil {
			c.alive()
			for i, r := range b.recs {
				c.own.done(r)
				delete(holds, b.recs[i].Partition)
			}
			return nil
		}
		if work.Err() != nil {
			return errGaveUp
		}
		var p *poisonError
		if errors.As(err, &p) && b.poison[p.index] == "" {
			c.markPoison(traced, b, p.index, p.err)
			continue
		}
		var crash *crashError
		if errors.As(err, &crash) {
			return err
		}
		if classify(err) != transient {
			// Some record's fault, or an error of neither kind: find the
			// record by applying the batch one record at a time.
			return c.isolate(ctx, traced, b, holds)
		}
		c.metrics.CountRetry(c.name)
		c.log.Warn("batch failed, retrying", "records", len(recs), "err", err)
		for _, idx := range b.partitions() {
			c.hold(b, idx, 0, holds, time.Time{})
		}
		return nil
	}
}

// hold keeps partition idx[from:] back for a retry after backoff. since is
// when recs[from] first failed with an unclassified error (zero: it did
// not).
func (c *Consumer) hold(b *batch, idx []int, from int, holds map[int32]*held, since time.Time) *held {
	first := b.recs[idx[from]]
	h := holds[first.Partition]
	attempt := 0
	if h != nil && h.recs[0].Offset == first.Offset {
		attempt = h.attempt + 1
		if since.IsZero() {
			since = h.since // a transient failure in between does not restart poisonAfter
		}
	}
	rest := make([]*kgo.Record, 0, len(idx)-from)
	for _, i := range idx[from:] {
		rest = append(rest, b.recs[i])
	}
	h = &held{recs: rest, attempt: attempt, due: time.Now().Add(retry.Backoff(attempt)), since: since}
	holds[first.Partition] = h
	return h
}

// isolate applies b one record at a time, partition by partition, in
// order, each in a transaction of its own, so a record at fault is
// dead-lettered alone and the others are applied: a permanent error at
// once, an error of neither kind once it has kept failing on that record
// alone for poisonAfter (while the database answers, so an outage never
// dead-letters anything). A record still failing holds back its own
// partition (hold) and no other; so does one whose dead letter itself is
// refused (the outbox or inbox answering 22xxx/23xxx), retried with capped
// backoff rather than at once. Past isolateBudget, partitions not yet
// reached are held too, due at once, so a rebalance can run in between.
func (c *Consumer) isolate(ctx, work context.Context, b *batch, holds map[int32]*held) error {
	start := time.Now()
	for _, idx := range b.partitions() {
		p := b.recs[idx[0]].Partition
		prev := holds[p]
	records:
		for k, i := range idx {
			if work.Err() != nil {
				return errGaveUp
			}
			if ctx.Err() != nil || time.Since(start) > isolateBudget {
				h := c.hold(b, idx, k, holds, time.Time{})
				h.attempt, h.due = 0, time.Now()
				break
			}
			if b.skip[i] {
				c.own.done(b.recs[i])
				continue
			}
			one := b.only(i)
			for {
				err := c.apply(work, one)
				if err == nil {
					c.alive()
					c.own.done(b.recs[i])
					continue records
				}
				if work.Err() != nil {
					return errGaveUp
				}
				var pe *poisonError
				var crash *crashError
				kind := classify(err)
				switch {
				case errors.As(err, &crash):
					return err
				case b.poison[i] != "":
					// Dead-lettering it failed: not the record's fault
					// any more, and trying again at once would spin.
					c.stats.DeadLetterFailures.Add(1)
					c.metrics.CountRetry(c.name)
					h := c.hold(b, idx, k, holds, time.Time{})
					c.log.Error("dead-lettering a record failed; its partition waits", "partition", p,
						"offset", b.recs[i].Offset, "attempt", h.attempt+1, "retry_in", time.Until(h.due).Round(time.Millisecond), "err", err)
					break records
				case errors.As(err, &pe):
					c.markPoison(work, b, pe.index, pe.err)
					continue
				case kind == permanent:
					c.markPoison(work, b, i, err)
					continue
				case kind == unknown:
					since := time.Now()
					if prev != nil && prev.recs[0].Offset == b.recs[i].Offset && !prev.since.IsZero() {
						since = prev.since
					}
					if time.Since(since) >= c.poisonAfter && c.pool.Ping(work) == nil {
						c.markPoison(work, b, i, fmt.Errorf("failed for %s with an error that is neither transient nor the record's: %w",
							c.poisonAfter, err))
						continue
					}
					c.metrics.CountRetry(c.name)
					h := c.hold(b, idx, k, holds, since)
					c.log.Warn("record failed; its partition waits", "partition", p, "offset", b.recs[i].Offset,
						"attempt", h.attempt+1, "failing_for", time.Since(since).Round(time.Millisecond), "err", err)
					break records
				default: // transient
					c.metrics.CountRetry(c.name)
					h := c.hold(b, idx, k, holds, time.Time{})
					c.log.Warn("record failed, retrying", "partition", p, "offset", b.recs[i].Offset, "attempt", h.attempt+1, "err", err)
					break records
				}
			}
		}
		if holds[p] == prev { // every record of p applied this round
			delete(holds, p)
		}
	}
	return nil
}

// partitions lists b's record indexes per partition, each in order.
func (b *batch) partitions() [][]int {
	at := map[int32]int{}
	var out [][]int
	for i, r := range b.recs {
		k, ok := at[r.Partition]
		if !ok {
			k = len(out)
			at[r.Partition] = k
			out = append(out, nil)
		}
		out[k] = append(out[k], i)
	}
	return out
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

// beginBatch starts a batch's transaction. A batch never waits between its
// statements, so PostgreSQL may end one left idle for seconds: its client
// was cut off mid-transaction (or froze), and its locks (inbox rows, stock
// rows) would otherwise hold up the instance that took its partitions over
// for as long as the cut lasts. Sent with BEGIN, it costs no round trip.
const beginBatch = `BEGIN; SET LOCAL idle_in_transaction_session_timeout = '5s'`

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
	tx, err := c.pool.BeginTx(ctx, pgx.TxOptions{BeginQuery: beginBatch})
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
