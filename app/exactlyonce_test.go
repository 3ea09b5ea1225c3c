package app_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/delivery"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/inventory"
	"github.com/prozess/prozess/modules/payment"
	statusp "github.com/prozess/prozess/modules/status"
	"github.com/prozess/prozess/schema/schematest"
)

// copies counts, per event type, the copies duplicate has published.
type copies struct {
	mu     sync.Mutex
	byType map[event.Type]int64
}

func (c *copies) add(typ event.Type) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.byType[typ]++
}

// total is every copy published.
func (c *copies) total() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int64
	for _, k := range c.byType {
		n += k
	}
	return n
}

// of is the copies published of the types participant p handles: each is
// one record p must skip.
func (c *copies) of(p saga.Handler) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int64
	for typ, k := range c.byType {
		if p.Handles(typ) {
			n += k
		}
	}
	return n
}

// duplicate re-publishes every record of the topic once more, so every
// participant sees every event twice, the second copy at a later offset (the
// same key, so the same partition, behind the original).
func duplicate(t *testing.T, brokers []string, topic string) *copies {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.ProducerLinger(0))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &copies{byType: map[event.Type]int64{}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			fs := cl.PollFetches(ctx)
			fs.EachRecord(func(r *kgo.Record) {
				for _, h := range r.Headers {
					if h.Key == "test-copy" {
						return
					}
				}
				dup := &kgo.Record{Topic: r.Topic, Key: r.Key, Value: r.Value,
					Headers: append(append([]kgo.RecordHeader(nil), r.Headers...), kgo.RecordHeader{Key: "test-copy", Value: []byte("1")})}
				if err := cl.ProduceSync(ctx, dup).FirstErr(); err == nil {
					c.add(recordType(r))
				}
			})
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait(); cl.Close() })
	return c
}

// recordType is a record's ce_type header.
func recordType(r *kgo.Record) event.Type {
	for _, h := range r.Headers {
		if h.Key == "ce_type" {
			return event.Type(h.Value)
		}
	}
	return ""
}

// handlers are the saga's participants as the consumer loop sees them, for
// which event types each one handles (the handlers need no clients for that).
func handlers() map[string]saga.Handler {
	return map[string]saga.Handler{
		"inventory": &inventory.Inventory{}, "payment": &payment.Payment{},
		"delivery": &delivery.Delivery{}, "status": &statusp.Status{},
	}
}

// eventsOf counts the audit log's events of the types p handles: the
// distinct events p must have applied, each once.
func (e *env) eventsOf(p saga.Handler) int64 {
	e.t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT type, count(*) FROM order_events GROUP BY type`)
	if err != nil {
		e.t.Fatal(err)
	}
	var n int64
	var typ string
	var k int64
	if _, err := pgx.ForEachRow(rows, []any{&typ, &k}, func() error {
		if p.Handles(event.Type(typ)) {
			n += k
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return n
}

// awaitSkipped waits until every participant of r has skipped at least
// want(participant) duplicates, and fails the test naming the ones that
// have not within timeout.
func (r *running) awaitSkipped(t *testing.T, timeout time.Duration, want func(saga.Handler) int64) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var short []string
		for name, h := range handlers() {
			st, ok := r.sys.Stats()[name]
			if !ok {
				t.Fatalf("no consumer stats for %s", name)
			}
			if got, w := st.Duplicates.Load(), want(h); got < w {
				short = append(short, fmt.Sprintf("%s skipped %d of %d", name, got, w))
			}
		}
		if len(short) == 0 {
			return
		}
		if time.Now().After(deadline) {
			slices.Sort(short)
			t.Fatalf("after %s: %s", timeout, strings.Join(short, "; "))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// assertInboxOnce checks, from the audit log counted now, that every
// participant's inbox holds exactly one row per event of the types it
// handles: each event was claimed once, however often it was delivered.
func (e *env) assertInboxOnce() {
	e.t.Helper()
	for name, h := range handlers() {
		events := e.eventsOf(h)
		if events == 0 {
			e.t.Errorf("%s handles no event of the audit log: nothing was measured", name)
		}
		if n := e.count(`SELECT count(*) FROM inbox WHERE consumer = $1`, name); n != events {
			e.t.Errorf("%s's inbox has %d rows for %d events of its types in the audit log", name, n, events)
		}
	}
}

// assertAppliedOnce is assertInboxOnce plus, for a system that ran from
// the start, each participant's applied counter: one per event of its types
// (an inbox that let a copy through applies it again, or dead-letters it;
// see assertNoDeadLetters).
func (r *running) assertAppliedOnce(t *testing.T) {
	t.Helper()
	r.e.assertInboxOnce()
	for name, h := range handlers() {
		if n, events := r.sys.Stats()[name].Applied.Load(), r.e.eventsOf(h); n != events {
			t.Errorf("%s applied %d events for %d of its types in the audit log", name, n, events)
		}
	}
}

// assertNoDeadLetters checks nothing was dead-lettered, neither in
// PostgreSQL nor on the dead-letter topic. The handlers are idempotent on
// keys of their own, so an inbox that let a copy through shows up as a
// unique violation (23505) dead-lettered, not as a doubled effect.
func (e *env) assertNoDeadLetters(brokers []string, dlqTopic string) {
	e.t.Helper()
	if n := e.count(`SELECT count(*) FROM dead_letters`); n != 0 {
		e.t.Errorf("%d dead letters in PostgreSQL, want none: %s", n, e.deadLetterReasons())
	}
	dls, err := saga.ReadDeadLetters(context.Background(), saga.Conn{Brokers: brokers}, dlqTopic)
	if err != nil {
		e.t.Fatal(err)
	}
	if len(dls) > 0 {
		by := map[string]int{}
		for _, d := range dls {
			by[d.Participant]++
		}
		e.t.Errorf("%d dead letters on %s, want none: %v; the first from %s: %s", len(dls), dlqTopic, by, dls[0].Participant, dls[0].Reason)
	}
}

// deadLetterReasons lists the dead_letters rows' participants and reasons.
func (e *env) deadLetterReasons() string {
	rows, err := e.pool.Query(context.Background(), `SELECT participant || ': ' || reason FROM dead_letters ORDER BY id LIMIT 10`)
	if err != nil {
		return err.Error()
	}
	reasons, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err.Error()
	}
	return strings.Join(reasons, "; ")
}

// assertExactlyOnce checks every order's effects happened once: one
// reservation set, at most one payment, one shipment per shipped order, an
// audit trail without repeats, stock conserved.
func (e *env) assertExactlyOnce(initial map[string]int64, current map[string]int64) {
	t := e.t
	t.Helper()
	// prozess check holds every at-most-once rule (one decision of each
	// kind per order, a shipment only with a completed payment, releases
	// only for declines); the stock is also compared with the snapshot the
	// test took before its orders.
	rdb, _ := schematest.NewRedis(t)
	rep, err := check.Run(context.Background(), e.pool, check.Config{Deadline: 0, Redis: rdb, Prefix: e.prefix})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Violations) > 0 {
		t.Errorf("prozess check found violations:\n%s", rep.Text())
	}
	for product, before := range initial {
		shipped := e.count(`SELECT coalesce(sum(i.qty), 0) FROM order_items i JOIN orders o ON o.id = i.order_id
			WHERE o.status = 'SHIPPED' AND i.product_id = $1`, product)
		if before != current[product]+shipped {
			t.Errorf("%s: initial %d != current %d + shipped %d", product, before, current[product], shipped)
		}
	}
}

func (e *env) awaitQuiet(timeout time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		pending := e.count(`SELECT count(*) FROM orders WHERE status NOT IN ('SHIPPED', 'CANCELLED')`)
		unreleased := e.count(`SELECT count(*) FROM payments p JOIN reservations r USING (order_id)
			WHERE (p.status = 'DECLINED' OR EXISTS (SELECT 1 FROM refunds f WHERE f.order_id = p.order_id)) AND r.released_at IS NULL`)
		outbox := e.count(`SELECT count(*) FROM outbox`)
		if pending+unreleased+outbox == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("after %s: %d orders not terminal, %d declined or refunded not released, %d outbox rows", timeout, pending, unreleased, outbox)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// awaitCopied waits until dups has published a copy of every event the
// audit log holds.
func (e *env) awaitCopied(dups *copies, timeout time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for dups.total() < e.count(`SELECT count(*) FROM order_events`) {
		if time.Now().After(deadline) {
			e.t.Fatalf("only %d copies published for %d events: not every event was delivered twice", dups.total(), e.count(`SELECT count(*) FROM order_events`))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestEveryEventDeliveredTwiceChangesNothing(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.PaymentDeclineRate = 0.3
	r := e.start(cfg)
	dups := duplicate(t, r.sys.Brokers(), cfg.Topic)
	initial := r.stock(t)
	const n = 40
	for i := range n {
		r.order(t, "u"+strconv.Itoa(i), "", mouse(1+i%2))
	}
	e.awaitQuiet(30 * time.Second)
	// Every event is copied once: wait until the duplicator has copied as
	// many as the audit log holds and every participant has skipped each
	// copy of a type it handles. The duplicator publishes one copy at a
	// time, which on a replicated cluster trails the saga, and the last
	// InventoryReleased can reach status after the orders are terminal, so
	// both are counted again until they agree.
	e.awaitCopied(dups, 60*time.Second)
	r.awaitSkipped(t, 60*time.Second, dups.of)
	e.awaitQuiet(10 * time.Second)
	if got, events := dups.total(), e.count(`SELECT count(*) FROM order_events`); got != events {
		t.Fatalf("%d copies published for %d events in the audit log, want one each", got, events)
	}
	// At least one skip per copy (awaitSkipped); more only if a rebalance
	// redelivered something, which the inbox skips too. What may never
	// happen is an event applied twice.
	for name, h := range handlers() {
		if got, want := r.sys.Stats()[name].Duplicates.Load(), dups.of(h); got != want {
			t.Logf("%s skipped %d duplicates for %d copies of its types: redelivered besides", name, got, want)
		}
	}
	r.assertAppliedOnce(t)
	e.assertExactlyOnce(initial, r.stock(t))
	e.assertNoDeadLetters(r.sys.Brokers(), cfg.DLQTopic())
}

// A participant that crashes after its database commit and before its offset
// commit gets the same records again on restart; the inbox makes the second
// delivery a no-op. The relay crashing before it publishes loses nothing; after
// it publishes and before it deletes, it publishes again and the inboxes skip
// the copies.
func TestCrashBetweenCommitsLosesAndDoublesNothing(t *testing.T) {
	for _, tc := range []struct{ who, point string }{
		{"inventory", saga.FaultAfterDBCommit}, {"payment", saga.FaultAfterDBCommit},
		{"delivery", saga.FaultAfterDBCommit}, {"status", saga.FaultAfterDBCommit},
		{"inventory", saga.FaultBeforeCommit},
		{"relay", saga.FaultRelayBeforePublish}, {"relay", saga.FaultRelayAfterPublish},
	} {
		t.Run(tc.who+"/"+tc.point, func(t *testing.T) {
			e := newEnv(t)
			cfg := e.config()
			cfg.PaymentDeclineRate = 0.5
			// One broker for all three runs: a partial serve uses the
			// brokers it is given, as participants in separate processes do.
			cfg.KafkaBrokers = e.broker()
			var crashed atomic.Bool
			cfg.Fault = func(participant, point string) error {
				if participant == tc.who && point == tc.point && crashed.CompareAndSwap(false, true) {
					return errors.New("crash")
				}
				return nil
			}
			// First the orders, without the participant to crash (for the
			// relay: with the api alone), so its first batch holds many.
			others := []string{"api"}
			if tc.who != "relay" {
				others = slices.DeleteFunc(app.Participants(), func(p string) bool { return p == tc.who })
			}
			calm := cfg
			calm.Fault = nil
			r0 := e.start(calm, others...)
			initial := r0.stock(t)
			var ids []string
			for i := range 10 {
				ids = append(ids, r0.order(t, "u1", "", mouse(1+i%3)).OrderID.String())
			}
			if err := r0.shutdown(t); err != nil {
				t.Fatal(err)
			}
			r := e.start(cfg)
			if err := r.wait(t, 20*time.Second); err == nil || !crashed.Load() {
				t.Fatalf("system stopped with %v, want the injected crash", err)
			}
			// Restart on the same database and broker data.
			cfg.Fault = nil
			r2 := e.start(cfg)
			for _, id := range ids {
				r2.await(t, id, 30*time.Second)
			}
			e.awaitQuiet(30 * time.Second)
			e.assertExactlyOnce(initial, r2.stock(t))
			var dups int64
			for _, st := range r2.sys.Stats() {
				dups += st.Duplicates.Load()
			}
			if tc.point == saga.FaultAfterDBCommit && r2.sys.Stats()[tc.who].Duplicates.Load() == 0 {
				t.Fatalf("%s saw no duplicates after the crash: the crashed batch was not delivered again", tc.who)
			}
			if tc.point == saga.FaultRelayAfterPublish && dups == 0 {
				t.Fatal("no duplicates after the relay crashed between publish and delete")
			}
			if n := e.count(`SELECT count(*) FROM orders`); n != int64(len(ids)) {
				t.Fatalf("%d orders, want %d", n, len(ids))
			}
			e.assertInboxOnce()
			e.assertNoDeadLetters(cfg.KafkaBrokers, cfg.DLQTopic())
		})
	}
}

// A record nobody can read goes to the dead-letter topic with its reason,
// and the records behind it on the same partition are processed.
func TestPoisonRecordIsDeadLetteredAndPartitionMovesOn(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.Partitions = 1
	r := e.start(cfg)
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...), kgo.ConsumeTopics(cfg.DLQTopic()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	poison := []*kgo.Record{
		{Topic: cfg.Topic, Key: []byte("garbage"), Value: []byte("{not json")},
		{Topic: cfg.Topic, Key: []byte("0192f0c4-0000-7000-8000-000000000000"), Value: []byte(`{}`),
			Headers: []kgo.RecordHeader{{Key: "ce_specversion", Value: []byte("1.0")}, {Key: "ce_type", Value: []byte("OrderCreated")},
				{Key: "ce_schemaversion", Value: []byte("99")}}},
	}
	oversized := sample(t, "OrderCreated")
	oversized.Topic = cfg.Topic
	oversized.Value = []byte(`{"pad":"` + strings.Repeat("x", event.MaxPayloadBytes) + `"}`)
	poison = append(poison, oversized)
	if err := cl.ProduceSync(t.Context(), poison...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	o := r.order(t, "u1", "", mouse(1))
	if got := r.await(t, o.OrderID.String(), 15*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order behind the poison ended %s", got.Status)
	}
	reasons := map[string]string{} // participant/offset -> reason
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	for len(reasons) < 5 && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(rec *kgo.Record) {
			h := map[string]string{}
			for _, kv := range rec.Headers {
				h[kv.Key] = string(kv.Value)
			}
			reasons[h[saga.HeaderDLQParticipant]+"/"+h[saga.HeaderDLQOffset]] = h[saga.HeaderDLQReason]
		})
	}
	// Unreadable record 0: status (which reads every type) dead-letters it.
	// Record 1 is an OrderCreated of an unknown version: inventory, which
	// handles OrderCreated, and status dead-letter it.
	// Record 2 is a well-formed OrderCreated whose payload is over the limit.
	for key, want := range map[string]string{"status/0": "specversion", "status/1": "schema version", "inventory/1": "schema version",
		"status/2": "bytes", "inventory/2": "bytes"} {
		if got, ok := reasons[key]; !ok || !strings.Contains(got, want) {
			t.Errorf("dead letter %s: reason %q, want one mentioning %q (all: %v)", key, got, want, reasons)
		}
	}
}

// Old events replayed out of order, long after the fact, change nothing:
// every effect is done, and status never goes backwards.
func TestOldEventsReplayedOutOfOrderChangeNothing(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.PaymentDeclineRate = 0.3
	r := e.start(cfg)
	initial := r.stock(t)
	for i := range 20 {
		r.order(t, "u1", "", mouse(1+i%2))
	}
	e.awaitQuiet(20 * time.Second)
	// Quiet is not caught up: status may still be recording the last
	// events (an InventoryReleased published after the order was
	// CANCELLED). Every record on the topic must be in the audit log.
	var before int64
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		before = e.count(`SELECT count(*) FROM order_events`)
		onTopic := recordsOnTopic(t, r.sys.Brokers(), cfg.Topic)
		if onTopic == before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d records on the topic, %d in the audit log after 20s", onTopic, before)
		}
	}
	statuses := e.count(`SELECT sum(hashtext(id::text || status)) FROM orders`)

	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...), kgo.ConsumeTopics(cfg.Topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var old []*kgo.Record
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for int64(len(old)) < before && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(rec *kgo.Record) {
			old = append(old, &kgo.Record{Topic: rec.Topic, Key: rec.Key, Value: rec.Value, Headers: rec.Headers})
		})
	}
	if int64(len(old)) != before {
		t.Fatalf("read %d records, the audit log has %d", len(old), before)
	}
	slices.Reverse(old) // newest first: every order's events backwards
	if err := cl.ProduceSync(t.Context(), old...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	// Every participant must skip each replayed record of a type it
	// handles, and nothing else twice.
	replayed := func(p saga.Handler) int64 {
		var n int64
		for _, rec := range old {
			if p.Handles(recordType(rec)) {
				n++
			}
		}
		return n
	}
	r.awaitSkipped(t, 30*time.Second, replayed)
	e.awaitQuiet(10 * time.Second)
	for name, h := range handlers() {
		if got, want := r.sys.Stats()[name].Duplicates.Load(), replayed(h); got != want {
			t.Logf("%s skipped %d duplicates for %d replayed records of its types: redelivered besides", name, got, want)
		}
	}
	if n := e.count(`SELECT count(*) FROM order_events`); n != before {
		t.Errorf("audit log grew from %d to %d rows on replay", before, n)
	}
	if s := e.count(`SELECT sum(hashtext(id::text || status)) FROM orders`); s != statuses {
		t.Error("an order's status changed on replay")
	}
	r.assertAppliedOnce(t)
	e.assertExactlyOnce(initial, r.stock(t))
	e.assertNoDeadLetters(r.sys.Brokers(), cfg.DLQTopic())
}

// Stock k, many more than k concurrent orders: exactly k are reserved.
func TestNoOversell(t *testing.T) {
	for _, k := range []int64{1, 3} {
		t.Run(strconv.FormatInt(k, 10), func(t *testing.T) {
			e := newEnv(t)
			r := e.start(e.config())
			schematest.Exec(t, e.pool, `UPDATE products SET stock = $1, received = $1 WHERE id = 'prod-monitor'`, k)
			var wg sync.WaitGroup
			for range 30 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r.order(t, "u1", "", event.Item{ProductID: "prod-monitor", Qty: 1})
				}()
			}
			wg.Wait()
			e.awaitQuiet(20 * time.Second)
			if n := e.count(`SELECT count(*) FROM reservations WHERE product_id = 'prod-monitor'`); n != k {
				t.Fatalf("%d reservations for a stock of %d", n, k)
			}
			if n := e.count(`SELECT count(*) FROM orders WHERE status = 'SHIPPED'`); n != k {
				t.Fatalf("%d orders shipped for a stock of %d", n, k)
			}
			if n := e.count(`SELECT stock FROM products WHERE id = 'prod-monitor'`); n != 0 {
				t.Fatalf("stock %d left", n)
			}
			e.assertNoDeadLetters(r.sys.Brokers(), e.config().DLQTopic())
		})
	}
}

// sample is a well-formed record of type typ for a new order.
func sample(t *testing.T, typ event.Type) *kgo.Record {
	t.Helper()
	ev, err := event.New(typ, uuid.New(), "api", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 1})
	if err != nil {
		t.Fatal(err)
	}
	return ev.Record("order-events")
}
