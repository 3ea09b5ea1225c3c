package saga

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/retry"
)

// relayLockID is the advisory lock that elects the one active relay among
// all prozess processes on a database: one publisher keeps the outbox's
// order, and standbys take over within a second if it dies.
const relayLockID = 0x70726f7a // "proz"

// LeaseTimeout bounds how long a relay that stopped working can hold the
// lock: the server ends the lock's session once it has been idle that long
// (idle_session_timeout, and idle_in_transaction_session_timeout for a
// relay stopped inside its settling transaction), and a healthy leader is
// never idle for more than its poll interval (1 s) or aloneWait (5 s): it
// never waits for the broker's acknowledgements, which a partition without
// a leader or enough in-sync replicas can withhold for minutes. A frozen
// process (SIGSTOP, a VM paused) or a vanished host goes silent and loses
// the lock; TCP keepalives alone would not free it from a frozen process,
// whose kernel still answers.
// A standby tries the lock every second, so it takes over within about
// LeaseTimeout + 1 s. The old leader, if it wakes, finds its session gone
// and becomes a standby; what it was publishing is published again, and the
// inboxes skip the copies.
const LeaseTimeout = 15 * time.Second

// Relay publishes outbox rows to Kafka with the idempotent producer and
// deletes them once acknowledged. A crash between the acknowledgement and
// the delete publishes a row twice; consumers' inboxes skip the second copy.
//
// Publishing is asynchronous and settled record by record: each round hands
// the producer the next rows (in id order) whose key has nothing in flight,
// and deletes what the broker acknowledged since the last round. A
// partition that cannot take writes (no leader, too few in-sync replicas)
// so keeps only its own records in flight (maxInflightPerPartition at
// most), retried by the producer, while the other partitions' rows keep
// flowing, and no wait of the relay
// outlasts its lock's lease (LeaseTimeout). An order's events keep their
// order: at most one record per key is in flight, and the next one is read
// only once that one is settled.
type Relay struct {
	log      *slog.Logger
	pool     *pgxpool.Pool
	producer *kgo.Client
	batch    int
	poll     time.Duration
	wake     chan struct{} // buffered: a wake during a publish is kept
	acked    chan struct{} // buffered: an outcome waits to be settled
	leading  atomic.Bool
	fault    FaultFunc
	metrics  *telemetry.Metrics
	tracing  *telemetry.Tracing

	mu       sync.Mutex
	outcomes []outcome // the producer's answers, not yet settled

	// Used by the leading loop alone (one lead at a time):
	inflight map[int64]flight                // outbox id -> its record, handed to the producer
	held     map[int64]*backoff              // outbox id -> when to try it again
	alone    map[int64]bool                  // ids to send alone: refused for good in company
	perPart  int                             // records in flight per partition at most
	parts    map[string]int32                // partitions per topic, to tell a key's partition
	hashers  map[string]kgo.TopicPartitioner // per topic, for partitionOf
	partsAt  time.Time                       // when parts was read
	warnedAt time.Time                       // when records long in flight were last logged
}

// flight is a record handed to the producer, not settled yet.
type flight struct {
	key       []byte
	topic     string
	partition int32 // -1: unknown (no key, or the topic's partitions unknown)
	since     time.Time
}

// outcome is the producer's answer for one outbox row.
type outcome struct {
	id    int64
	alone bool
	rec   *kgo.Record
	err   error
}

// backoff holds a row (and so its key's later rows) back after a transient
// failure, longer after each.
type backoff struct {
	key      []byte
	attempts int
	until    time.Time
}

// NewRelay creates the relay and its producer.
func NewRelay(log *slog.Logger, pool *pgxpool.Pool, conn Conn, fault FaultFunc, m *telemetry.Metrics, t *telemetry.Tracing) (*Relay, error) {
	opts := conn.Opts(m.KafkaHooks()...)
	opts = append(opts,
		kgo.ClientID("prozess-relay"),
		// The relay hands over whole batches; lingering only adds latency.
		kgo.ProducerLinger(0),
		// Named, not left to the default: the relay computes a key's
		// partition the same way (partitionOf) to cap what is in flight
		// per partition. For keyed records it is the default's hash.
		kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)),
		kgo.RequiredAcks(kgo.AllISRAcks()),
	)
	opts = append(opts, t.PublishHooks("prozess-relay")...)
	producer, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("creating relay kafka client: %w", err)
	}
	return &Relay{log: log, pool: pool, producer: producer, batch: 1000, poll: time.Second,
		wake: make(chan struct{}, 1), acked: make(chan struct{}, 1), fault: fault, metrics: m, tracing: t,
		inflight: map[int64]flight{}, held: map[int64]*backoff{}, alone: map[int64]bool{}, perPart: maxInflightPerPartition}, nil
}

// Ping checks that the broker answers, for readiness.
func (r *Relay) Ping(ctx context.Context) error { return r.producer.Ping(ctx) }

// Admin is an admin client on the relay's connections, for the metrics'
// lag.
func (r *Relay) Admin() *kadm.Client { return kadm.NewClient(r.producer) }

// Close flushes nothing (every publish is synchronous) and closes the client.
func (r *Relay) Close() { r.producer.Close() }

// Run relays until ctx is cancelled, reconnecting after any failure.
func (r *Relay) Run(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		err := r.lead(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var crash *crashError
		if errors.As(err, &crash) {
			return err
		}
		r.log.Warn("outbox relay interrupted, retrying", "err", err)
		if retry.Wait(ctx, attempt) != nil {
			return nil
		}
	}
}

// Wake makes the relay look at the outbox now, if it is the leader: rows
// were just committed in this process.
func (r *Relay) Wake() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Leading reports whether this process's relay holds the lock.
func (r *Relay) Leading() bool { return r.leading.Load() }

// lead takes the relay lock on a dedicated connection (the lock lives as long
// as the session) and relays while holding it.
func (r *Relay) lead(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, r.pool.Config().ConnConfig.Copy())
	if err != nil {
		return fmt.Errorf("connecting: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for {
		var got bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, relayLockID).Scan(&got); err != nil {
			return fmt.Errorf("taking relay lock: %w", err)
		}
		if got {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	r.leading.Store(true)
	defer r.leading.Store(false)
	clear(r.held) // a new term: try what failed before at once
	r.log.Info("outbox relay active: this process publishes the outbox")
	// Deleting published rows need not wait for the WAL flush: a delete lost
	// in a database crash only publishes those rows again, and every
	// consumer's inbox skips them. That takes an fsync off every saga hop.
	if _, err := conn.Exec(ctx, `SET synchronous_commit = off`); err != nil {
		return fmt.Errorf("configuring relay session: %w", err)
	}
	// The lease (see LeaseTimeout); keepalives for a peer that vanished
	// mid-query. idle_session_timeout needs PostgreSQL 14.
	// Both idle timeouts: frozen between statements the session is idle, frozen
	// inside settle's transaction it is idle in transaction (the transaction
	// rolls back, the rows stay, the standby publishes them).
	if _, err := conn.Exec(ctx, fmt.Sprintf(`SET idle_session_timeout = %[1]d; SET idle_in_transaction_session_timeout = %[1]d; `+
		`SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3`,
		LeaseTimeout.Milliseconds())); err != nil {
		r.log.Warn("relay lease not set: a frozen relay could hold the outbox until its connection dies (PostgreSQL 14 or later has idle_session_timeout)", "err", err)
	}
	if _, err := conn.Exec(ctx, `LISTEN prozess_outbox`); err != nil {
		return fmt.Errorf("listening for outbox notifications: %w", err)
	}
	for {
		n, err := r.publish(ctx, conn)
		if err != nil {
			return err
		}
		if n == r.batch {
			continue // more waiting
		}
		// Woken in process (Wake, after a commit here), by a NOTIFY from
		// another process's OutboxSignal, or by the poll.
		wctx, cancel := context.WithTimeout(ctx, r.poll)
		woken := make(chan struct{})
		go func() {
			defer close(woken)
			select {
			case <-r.wake:
				cancel()
			case <-r.acked:
				cancel()
			case <-wctx.Done():
			}
		}()
		_, err = conn.WaitForNotification(wctx)
		cancel()
		<-woken
		if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("waiting for outbox notification: %w", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// maxInflightPerPartition caps the records in flight to one partition, and
// maxPages how many pages of batch rows a round reads past the rows of
// partitions at the cap: a partition that takes no writes for long holds
// at most this many of its records in the producer, and the rows behind
// them are still found.
const (
	maxInflightPerPartition = 1000
	maxPages                = 10
)

// slowAck is how long a record may wait for its acknowledgement before the
// relay logs it.
const slowAck = 10 * time.Second

// aloneWait bounds how long a round waits for a record sent alone (to learn
// whether a refusal was its own fault): well below LeaseTimeout, since the
// lock's session is idle meanwhile.
const aloneWait = 5 * time.Second

// publish settles what the producer answered since the last round, then
// hands it the next rows, and returns how many it handed over. It deletes by
// id, never by range: a transaction that took a lower id may commit later,
// and its row must stay until published.
func (r *Relay) publish(ctx context.Context, conn *pgx.Conn) (int, error) {
	if err := r.settleOutcomes(ctx, conn); err != nil {
		return 0, err
	}
	// Rows in flight, and rows held back after a failure, are skipped, and
	// so are their keys' later rows: an order's next event is published only
	// once the one before it is.
	now := time.Now()
	skipIDs := []int64{} // not nil: NULL would match no row
	skipKeys := [][]byte{}
	busy := map[string]map[int32]int{} // records in flight per topic and partition
	var late int                       // records in flight for longer than slowAck
	var oldest flight
	for id, f := range r.inflight {
		if now.Sub(f.since) > slowAck {
			late++
			if oldest.since.IsZero() || f.since.Before(oldest.since) {
				oldest = f
			}
		}
		skipIDs = append(skipIDs, id)
		if f.key != nil {
			skipKeys = append(skipKeys, f.key)
		}
		if f.partition >= 0 {
			if busy[f.topic] == nil {
				busy[f.topic] = map[int32]int{}
			}
			busy[f.topic][f.partition]++
		}
	}
	for id, b := range r.held {
		if now.Before(b.until) {
			skipIDs = append(skipIDs, id)
			if b.key != nil {
				skipKeys = append(skipKeys, b.key)
			}
		}
	}
	// The producer retries what a partition refuses for the moment without
	// telling; the log does, every slowAck.
	if late > 0 && now.Sub(r.warnedAt) > slowAck {
		r.warnedAt = now
		r.log.Warn("outbox records waiting for the broker's acknowledgement (a partition without a leader or enough in-sync replicas?); the other partitions go on",
			"records", late, "oldest_topic", oldest.topic, "oldest_partition", oldest.partition, "oldest_for", now.Sub(oldest.since).Round(time.Second))
	}
	r.refreshPartitions(ctx)
	// A partition with perPart records in flight (one that takes no writes,
	// most likely) gets no more: its rows are passed over, and the pages
	// after them read, so the other partitions' rows keep flowing and the
	// producer's buffer never fills with one partition's records.
	var ids []int64
	var recs []*kgo.Record
	var parts []int32
	seen := map[string]bool{}
	for page, after := 0, int64(0); page < maxPages && len(recs) < r.batch; page++ {
		rows, err := conn.Query(ctx, `SELECT id, topic, key, value, headers, header_bytes FROM outbox
			WHERE id > $4 AND id NOT IN (SELECT unnest($2::bigint[]))
				AND (key IS NULL OR key NOT IN (SELECT unnest($3::bytea[])))
			ORDER BY id LIMIT $1`, r.batch, skipIDs, skipKeys, after)
		if err != nil {
			return 0, fmt.Errorf("reading outbox: %w", err)
		}
		var id int64
		var topic string
		var key, value, headers, headerBytes []byte
		n, full := 0, false
		_, err = pgx.ForEachRow(rows, []any{&id, &topic, &key, &value, &headers, &headerBytes}, func() error {
			n, after = n+1, id
			if len(recs) == r.batch {
				return nil
			}
			if key != nil {
				if seen[string(key)] {
					return nil // its key's earlier row goes first
				}
				seen[string(key)] = true
			}
			part := r.partitionOf(topic, key)
			if part >= 0 {
				if busy[topic] == nil {
					busy[topic] = map[int32]int{}
				}
				if busy[topic][part] >= r.perPart {
					full = true
					return nil // and its key's later rows, seen now
				}
				busy[topic][part]++
			}
			hs, err := event.OutboxHeaders(headerBytes, headers)
			if err != nil {
				return fmt.Errorf("outbox row %d: %w", id, err)
			}
			ids = append(ids, id)
			parts = append(parts, part)
			recs = append(recs, &kgo.Record{Topic: topic, Key: bytes.Clone(key), Value: bytes.Clone(value), Headers: hs})
			return nil
		})
		if err != nil {
			return 0, fmt.Errorf("reading outbox: %w", err)
		}
		if n < r.batch || !full {
			break // the end of the outbox, or nothing passed over
		}
	}
	if len(recs) == 0 {
		return 0, nil
	}
	if err := r.faultAt(FaultRelayBeforePublish); err != nil {
		return 0, err
	}
	for _, rec := range recs {
		r.tracing.ContinueFromHeaders(ctx, rec)
	}
	// A broker refuses a whole batch for one record in it: a record refused
	// for good in company is sent again alone, before the others, and only
	// a refusal alone parks it.
	for i, rec := range recs {
		if r.alone[ids[i]] {
			done := make(chan struct{})
			r.produce(ctx, ids[i], parts[i], rec, true, done)
			select {
			case <-done:
			case <-time.After(aloneWait):
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		}
	}
	for i, rec := range recs {
		if !r.alone[ids[i]] {
			r.produce(ctx, ids[i], parts[i], rec, false, nil)
		}
	}
	return len(recs), nil
}

// produce hands one row's record to the producer without waiting: its
// outcome is settled by a later round. TryProduce fails at once rather than
// block when the producer's buffer is full (records of a partition that
// takes no writes can fill it); the row is then tried again later.
func (r *Relay) produce(ctx context.Context, id int64, partition int32, rec *kgo.Record, alone bool, done chan struct{}) {
	r.inflight[id] = flight{key: rec.Key, topic: rec.Topic, partition: partition, since: time.Now()}
	r.producer.TryProduce(ctx, rec, func(rec *kgo.Record, err error) {
		r.mu.Lock()
		r.outcomes = append(r.outcomes, outcome{id: id, alone: alone, rec: rec, err: err})
		r.mu.Unlock()
		if done != nil {
			close(done)
		}
		select {
		case r.acked <- struct{}{}:
		default:
		}
	})
}

// settleOutcomes deletes the rows the broker acknowledged and parks those it
// refused alone for good, in one transaction; rows that failed for now are
// held back, longer after each failure (capped at retry.Cap, well below
// the lease), and tried again.
func (r *Relay) settleOutcomes(ctx context.Context, conn *pgx.Conn) error {
	r.mu.Lock()
	outs := r.outcomes
	r.outcomes = nil
	r.mu.Unlock()
	if len(outs) == 0 {
		return nil
	}
	var published, parked []int64
	var reasons []string
	var failed []outcome
	for _, o := range outs {
		switch {
		case o.err == nil:
			published = append(published, o.id)
		case ownFault(o.err) && o.alone:
			parked = append(parked, o.id)
			reasons = append(reasons, o.err.Error())
			r.log.Error("outbox record refused by the broker for good; parked", "outbox_id", o.id, "topic", o.rec.Topic,
				"bytes", len(o.rec.Value), "err", o.err)
		case ownFault(o.err):
			r.alone[o.id] = true
			delete(r.inflight, o.id) // sent again alone next round
		default:
			failed = append(failed, o)
		}
	}
	if len(published) > 0 {
		if err := r.faultAt(FaultRelayAfterPublish); err != nil {
			return err
		}
	}
	if len(published)+len(parked) > 0 {
		if err := r.settle(ctx, conn, published, parked, reasons); err != nil {
			// Settled by a later round (or published again by the next
			// leader, and skipped by the inboxes).
			r.mu.Lock()
			r.outcomes = append(outs, r.outcomes...)
			r.mu.Unlock()
			return err
		}
	}
	r.metrics.CountPublished(len(published))
	for _, id := range append(published, parked...) {
		delete(r.inflight, id)
		delete(r.held, id)
		delete(r.alone, id)
	}
	// A failure of the moment, or of the cluster (not authorized, topic
	// missing): the row is the world's victim, not at fault; it stays in
	// the outbox and is tried again, and the metric and the log say why.
	now := time.Now()
	for _, o := range failed {
		delete(r.inflight, o.id)
		b := r.held[o.id]
		if b == nil {
			b = &backoff{key: o.rec.Key}
			r.held[o.id] = b
		}
		b.until = now.Add(retry.Backoff(b.attempts))
		b.attempts++
		r.metrics.CountPublishError(errorCode(o.err))
	}
	if len(failed) > 0 {
		r.log.Warn("outbox records not published, trying them again", "records", len(failed), "err", failed[0].err,
			"outbox_id", failed[0].id, "topic", failed[0].rec.Topic)
	}
	return nil
}

// settle deletes the published rows and moves the parked ones, in one
// transaction.
func (r *Relay) settle(ctx context.Context, conn *pgx.Conn, published, parked []int64, reasons []string) error {
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if len(parked) > 0 {
			if _, err := tx.Exec(ctx, `
				INSERT INTO parked (id, topic, key, value, headers, header_bytes, created_at, error)
				SELECT o.id, o.topic, o.key, o.value, o.headers, o.header_bytes, o.created_at, p.error
				FROM outbox o JOIN unnest($1::bigint[], $2::text[]) AS p(id, error) USING (id)
				ON CONFLICT (id) DO NOTHING`, parked, reasons); err != nil {
				return fmt.Errorf("parking refused outbox rows: %w", err)
			}
		}
		if _, err := tx.Exec(ctx, `DELETE FROM outbox WHERE id = ANY($1)`, append(published, parked...)); err != nil {
			return fmt.Errorf("deleting published outbox rows: %w", err)
		}
		return r.faultAt(FaultRelayInSettle)
	})
}

// ownFault tells the refusals that are the record's own fault, which no
// retry of it as it is can change: too large, malformed. A record refused
// so in company is sent again alone before it is parked. Everything else
// (not authorized, the topic or partition missing, a policy, a leader
// election, too few in-sync replicas) is the cluster's state, not the
// record's: parking would take every record of the outage out of the saga
// for good, so those are retried until the cluster is fixed.
func ownFault(err error) bool {
	for _, e := range []error{kerr.MessageTooLarge, kerr.RecordListTooLarge, kerr.InvalidRecord, kerr.CorruptMessage} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// errorCode names a publish failure for the metric's label: Kafka's error
// code, or a few kinds of the client's own.
func errorCode(err error) string {
	var ke *kerr.Error
	switch {
	case errors.As(err, &ke):
		return ke.Message
	case errors.Is(err, kgo.ErrMaxBuffered):
		return "CLIENT_BUFFER_FULL"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "CANCELLED"
	default:
		return "CLIENT"
	}
}

func (r *Relay) faultAt(point string) error {
	if r.fault != nil && r.fault("relay", point) != nil {
		return &crashError{point: point}
	}
	return nil
}

// partitionOf is the partition the producer will give a keyed record (the
// partitioner's hash of the key), or -1 when that is unknown: no key, or
// the topic's partitions not read.
func (r *Relay) partitionOf(topic string, key []byte) int32 {
	n := r.parts[topic]
	if key == nil || n <= 0 {
		return -1
	}
	// One partitioner per topic, kept: making one seeds a random source
	// (for records without a key), which cost more than the rest of a
	// round's per-row work together.
	tp := r.hashers[topic]
	if tp == nil {
		if r.hashers == nil {
			r.hashers = map[string]kgo.TopicPartitioner{}
		}
		tp = kgo.StickyKeyPartitioner(nil).ForTopic(topic)
		r.hashers[topic] = tp
	}
	return int32(tp.Partition(&kgo.Record{Key: key}, int(n)))
}

// refreshPartitions reads how many partitions the topics the relay
// publishes to have, every 30 s at most, within a bound well below the
// lease. A failure keeps what it knew (caps per partition are an
// optimisation; order per key holds without them).
func (r *Relay) refreshPartitions(ctx context.Context) {
	if time.Since(r.partsAt) < 30*time.Second {
		return
	}
	r.partsAt = time.Now()
	mctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	tds, err := kadm.NewClient(r.producer).ListTopics(mctx)
	if err != nil {
		r.log.Debug("reading topics' partition counts", "err", err)
		return
	}
	parts := map[string]int32{}
	for name, td := range tds {
		if td.Err == nil && len(td.Partitions) > 0 {
			parts[name] = int32(len(td.Partitions))
		}
	}
	r.parts = parts
}
