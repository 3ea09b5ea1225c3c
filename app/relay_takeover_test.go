package app_test

import (
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// A relay whose process freezes (SIGSTOP: its kernel still answers TCP, so
// keepalives cannot tell) loses the outbox within saga.LeaseTimeout: a
// standby in another process publishes within 30 s, the frozen one, woken,
// becomes a standby, and nothing was applied twice.
func TestRelayTakeoverFromFrozenLeader(t *testing.T) {
	e := newEnv(t)
	var k sagatest.Kafka
	if e.kafka != nil {
		k = *e.kafka
	} else {
		k = sagatest.New(t)
	}
	env := []string{
		"PROZESS_DATABASE_URL=" + e.dbURL, "PROZESS_REDIS_ADDR=" + schematest.RedisAddr(t), "PROZESS_REDIS_PREFIX=" + e.prefix,
		"PROZESS_KAFKA_BROKERS=" + k.Brokers[0], "PROZESS_TOPIC=" + k.Topic, "PROZESS_GROUP_PREFIX=" + k.GroupPrefix,
		"PROZESS_LOG_FORMAT=json", "PROZESS_RATE_LIMIT=0", "PROZESS_ADMIN_ADDR=127.0.0.1:0", "PROZESS_PAYMENT_DECLINE_RATE=0",
	}
	relayActive := func(m map[string]any) bool {
		return m["msg"] == "outbox relay active: this process publishes the outbox"
	}
	// The leader runs delivery: while it is frozen, orders stop at PAID,
	// which proves the standby (with inventory and payment) published them.
	leader := spawn(t, env, "serve", "delivery")
	leader.await(t, "the relay lock", relayActive)
	standby := spawn(t, env, "serve", "api", "inventory", "payment", "status", "--http-addr", "127.0.0.1:0")
	r := &running{e: e, url: "http://" + standby.ready(t)["http"].(string)}
	initial := r.stock(t)
	first := r.order(t, "u1", "", mouse(1))
	if got := r.await(t, first.OrderID.String(), 30*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("first order ended %s", got.Status)
	}

	if err := leader.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	frozen := time.Now()
	var ids []string
	for i := range 5 {
		ids = append(ids, r.order(t, "u1", "", mouse(1+i%2)).OrderID.String())
	}
	standby.await(t, "the standby taking the relay lock", relayActive)
	took := time.Since(frozen)
	t.Logf("standby relay active %.1fs after the leader froze (lease %s)", took.Seconds(), saga.LeaseTimeout)
	if took > 30*time.Second {
		t.Fatalf("takeover took %s, want within 30s", took)
	}
	for _, id := range ids {
		if got := r.awaitStatus(t, id, event.StatusPaid, 30*time.Second); got.Status != event.StatusPaid {
			t.Fatalf("order %s is %s with the leader frozen, want PAID (published by the standby)", id, got.Status)
		}
	}

	if err := leader.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// Woken, the old leader finds its lock session ended by the lease and
	// stands down: its relay is interrupted and, the lock being held, never
	// active again.
	leader.await(t, "the woken leader's relay losing its lock session", func(m map[string]any) bool {
		return m["msg"] == "outbox relay interrupted, retrying"
	})
	for _, id := range ids {
		if got := r.awaitStatus(t, id, event.StatusShipped, 60*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s after the leader woke; leader:\n%s", id, got.Status, leader.tail())
		}
	}
	// One more order with both awake, published by the standby.
	last := r.order(t, "u1", "", mouse(1)).OrderID.String()
	if got := r.await(t, last, 30*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order after the leader woke ended %s", got.Status)
	}
	e.awaitQuiet(30 * time.Second)
	e.assertExactlyOnce(initial, r.stock(t))
	if n := e.count(`SELECT count(*) FROM shipments`); n != 7 {
		t.Fatalf("%d shipments for 7 orders", n)
	}
	if m, ok := leader.seen(relayActive); ok {
		t.Errorf("the woken leader took the relay lock again: %v", m)
	}
	if m, ok := standby.seen(func(m map[string]any) bool { return m["msg"] == "outbox relay interrupted, retrying" }); ok {
		t.Errorf("the standby lost the relay lock after the leader woke: %v", m)
	}
	// Published once: the topic holds one record per event of the audit
	// log and no event id twice (a relay that kept publishing after
	// losing the lock would republish rows the other relay published).
	records, eventIDs := topicEventIDs(t, k.Brokers, k.Topic)
	if events := e.count(`SELECT count(*) FROM order_events`); records != events || int64(len(eventIDs)) != events {
		t.Errorf("%d records with %d distinct event ids on the topic for %d events in the audit log", records, len(eventIDs), events)
	}
	e.assertNoDeadLetters(k.Brokers, k.Topic+".dlq")
}

// seen reads the log lines p has written so far (without waiting) and
// returns the first for which match is true.
func (p *proc) seen(match func(map[string]any) bool) (map[string]any, bool) {
	for {
		select {
		case m := <-p.lines:
			if match(m) {
				return m, true
			}
		default:
			return nil, false
		}
	}
}

// topicEventIDs reads topic from its start to its end as it is now and
// returns how many records it holds and each event id's count.
func topicEventIDs(t *testing.T, brokers []string, topic string) (int64, map[string]int) {
	t.Helper()
	records := readTopic(t, brokers, topic)
	ids := map[string]int{}
	for _, r := range records {
		for _, h := range r.Headers {
			if h.Key == "ce_id" {
				ids[string(h.Value)]++
			}
		}
	}
	return int64(len(records)), ids
}

// A leader stopped inside its settling transaction (idle in transaction,
// which idle_session_timeout alone does not cover; CI's Kafka run caught
// it) loses the lock within the lease too: the standby publishes, the
// order ships, nothing is applied twice.
func TestRelayTakeoverFromLeaderStuckInTransaction(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	hold := make(chan struct{})
	var held atomic.Bool
	leaderCfg := cfg
	leaderCfg.Fault = func(participant, point string) error {
		if participant == "relay" && point == saga.FaultRelayInSettle && held.CompareAndSwap(false, true) {
			<-hold // stopped inside the transaction, as a frozen process would be
		}
		return nil
	}
	leader := e.start(leaderCfg, "api") // first: its relay leads
	initial := leader.stock(t)
	id := leader.order(t, "u1", "", mouse(1)).OrderID.String()
	for !held.Load() {
		time.Sleep(10 * time.Millisecond)
	}
	stuck := time.Now()
	e.start(cfg, "inventory", "payment", "delivery", "status") // its relay stands by
	if got := leader.await(t, id, 45*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order ended %s", got.Status)
	}
	t.Logf("order shipped %.1fs after the leader stopped in its transaction (lease %s)", time.Since(stuck).Seconds(), saga.LeaseTimeout)
	close(hold)
	e.awaitQuiet(30 * time.Second)
	e.assertExactlyOnce(initial, leader.stock(t))
}
