package saga

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
// never idle for more than its poll interval plus one publish. A frozen
// process (SIGSTOP, a VM paused) or a vanished host goes silent and loses
// the lock; TCP keepalives alone would not free it from a frozen process,
// whose kernel still answers.
// A standby tries the lock every second, so it takes over within about
// LeaseTimeout + 1 s. The old leader, if it wakes, finds its session gone
// and becomes a standby; what it was publishing is published again, and the
// inboxes skip the copies.
const LeaseTimeout = 15 * time.Second

// Relay publishes outbox rows to Kafka in id order with the idempotent
// producer and deletes them once acknowledged. A crash between the
// acknowledgement and the delete publishes a row twice; consumers' inboxes
// skip the second copy.
type Relay struct {
	log      *slog.Logger
	pool     *pgxpool.Pool
	producer *kgo.Client
	batch    int
	poll     time.Duration
	wake     chan struct{} // buffered: a wake during a publish is kept
	leading  atomic.Bool
	fault    FaultFunc
	metrics  *telemetry.Metrics
	tracing  *telemetry.Tracing
}

// NewRelay creates the relay and its producer.
func NewRelay(log *slog.Logger, pool *pgxpool.Pool, conn Conn, fault FaultFunc, m *telemetry.Metrics, t *telemetry.Tracing) (*Relay, error) {
	opts := conn.Opts(m.KafkaHooks()...)
	opts = append(opts,
		kgo.ClientID("prozess-relay"),
		// The relay hands over whole batches; lingering only adds latency.
		kgo.ProducerLinger(0),
		kgo.RequiredAcks(kgo.AllISRAcks()),
	)
	opts = append(opts, t.PublishHooks("prozess-relay")...)
	producer, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("creating relay kafka client: %w", err)
	}
	return &Relay{log: log, pool: pool, producer: producer, batch: 1000, poll: time.Second, wake: make(chan struct{}, 1), fault: fault, metrics: m, tracing: t}, nil
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

// publish sends one batch of outbox rows and deletes them once every record
// is acknowledged. It deletes by id, never by range: a transaction that took
// a lower id may commit later, and its row must stay until published.
func (r *Relay) publish(ctx context.Context, conn *pgx.Conn) (int, error) {
	rows, err := conn.Query(ctx, `SELECT id, topic, key, value, headers, header_bytes FROM outbox ORDER BY id LIMIT $1`, r.batch)
	if err != nil {
		return 0, fmt.Errorf("reading outbox: %w", err)
	}
	var ids []int64
	var recs []*kgo.Record
	var id int64
	var topic string
	var key, value, headers, headerBytes []byte
	_, err = pgx.ForEachRow(rows, []any{&id, &topic, &key, &value, &headers, &headerBytes}, func() error {
		hs, err := event.OutboxHeaders(headerBytes, headers)
		if err != nil {
			return fmt.Errorf("outbox row %d: %w", id, err)
		}
		ids = append(ids, id)
		recs = append(recs, &kgo.Record{Topic: topic, Key: key, Value: value, Headers: hs})
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("reading outbox: %w", err)
	}
	if len(recs) == 0 {
		return 0, nil
	}
	if err := r.faultAt(FaultRelayBeforePublish); err != nil {
		return 0, err
	}
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, rec := range recs {
		r.tracing.ContinueFromHeaders(pctx, rec)
	}
	index := make(map[*kgo.Record]int, len(recs))
	for i, rec := range recs {
		index[rec] = i
	}
	// Record by record: what the broker took is deleted, what it refused
	// for good is parked with its error, and only what failed for now is
	// tried again, so one bad record neither stops the outbox nor makes
	// the others publish twice.
	var published, parked []int64
	var reasons []string
	var transient error
	var refused []*kgo.Record
	for _, res := range r.producer.ProduceSync(pctx, recs...) {
		switch {
		case res.Err == nil:
			published = append(published, ids[index[res.Record]])
		case refusedForGood(res.Err):
			refused = append(refused, res.Record)
		case transient == nil:
			transient = res.Err
		}
	}
	// A broker refuses a whole batch for one record in it: alone, the
	// others go through, and only the record at fault is parked.
	for _, rec := range refused {
		err := r.producer.ProduceSync(pctx, rec).FirstErr()
		id := ids[index[rec]]
		switch {
		case err == nil:
			published = append(published, id)
		case refusedForGood(err):
			parked = append(parked, id)
			reasons = append(reasons, err.Error())
			r.log.Error("outbox record refused by the broker for good; parked", "outbox_id", id, "topic", rec.Topic,
				"bytes", len(rec.Value), "err", err)
		case transient == nil:
			transient = err
		}
	}
	r.metrics.CountPublished(len(published))
	if err := r.faultAt(FaultRelayAfterPublish); err != nil {
		return 0, err
	}
	if err := r.settle(ctx, conn, published, parked, reasons); err != nil {
		return 0, err
	}
	if transient != nil {
		return 0, fmt.Errorf("publishing %d of %d outbox records: %w", len(recs)-len(published)-len(parked), len(recs), transient)
	}
	return len(recs), nil
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

// refusedForGood tells the broker's (or the client's own) refusals that no
// retry can change, for this record as it is, from failures of the moment.
func refusedForGood(err error) bool {
	for _, e := range []error{
		kerr.MessageTooLarge, kerr.RecordListTooLarge, kerr.InvalidRecord, kerr.CorruptMessage,
		kerr.TopicAuthorizationFailed, kerr.InvalidTopicException, kerr.PolicyViolation,
		kerr.UnknownTopicOrPartition, // after the client's own retries: the topic is gone
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (r *Relay) faultAt(point string) error {
	if r.fault != nil && r.fault("relay", point) != nil {
		return &crashError{point: point}
	}
	return nil
}
