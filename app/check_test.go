package app_test

import (
	"bytes"
	"context"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
	"github.com/prozess/prozess/schema/schematest"
)

// runCLI runs prozess with args as a user would, its output captured, with
// a data directory of its own, so no server recorded by a prozess running
// in the test's working directory is ever reached.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := app.NewRootCommand()
	cmd.SetArgs(append([]string{"--data-dir", t.TempDir()}, args...))
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

func (e *env) checkArgs(brokers []string) []string {
	return []string{"check", "--database-url", e.dbURL, "--redis-addr", schematest.RedisAddr(e.t), "--redis-prefix", e.prefix,
		"--kafka-brokers", strings.Join(brokers, ","), "--log-level", "warn"}
}

func TestCheckPassesThenFindsEveryCorruption(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.PaymentDeclineRate = 0.4
	r := e.start(cfg)
	var ids []string
	for i := range 20 {
		items := []event.Item{mouse(1 + i%2)}
		if i%5 == 0 {
			items = []event.Item{{ProductID: "prod-webcam", Qty: 1}}
		}
		ids = append(ids, r.order(t, "u1", "", items...).OrderID.String())
	}
	byStatus := map[event.Status][]string{}
	for _, id := range ids {
		o := r.await(t, id, 20*time.Second)
		byStatus[o.Status] = append(byStatus[o.Status], id)
	}
	e.awaitQuiet(20 * time.Second)
	out, err := runCLI(t, e.checkArgs(r.sys.Brokers())...)
	if err != nil {
		t.Fatalf("check of a healthy system failed: %v\n%s", err, out)
	}
	if !strings.Contains(out, "20 orders (20 terminal") || strings.Contains(out, "FAIL") {
		t.Fatalf("unexpected report:\n%s", out)
	}
	var declined string
	if err := e.pool.QueryRow(t.Context(), `SELECT order_id::text FROM payments WHERE status = 'DECLINED' LIMIT 1`).Scan(&declined); err != nil {
		t.Fatalf("no declined order to corrupt: %v", err)
	}
	shipped := byStatus[event.StatusShipped][0]

	// Corrupt the record, one rule at a time.
	schematest.Exec(t, e.pool, `UPDATE products SET stock = stock + 5 WHERE id = 'prod-mouse'`)
	schematest.Exec(t, e.pool, `INSERT INTO order_events (event_id, order_id, type, source, occurred_at, payload)
		VALUES (gen_random_uuid(), $1, 'OrderShipped', 'delivery', now(), '{}')`, shipped)
	schematest.Exec(t, e.pool, `UPDATE orders SET status = 'SHIPPED' WHERE id = $1`, declined)
	schematest.Exec(t, e.pool, `UPDATE reservations SET released_at = NULL WHERE order_id = $1`, declined)
	schematest.Exec(t, e.pool, `UPDATE payments SET created_at = now() - interval '5 minutes' WHERE order_id = $1`, declined)
	stuck := uuid.New()
	schematest.Exec(t, e.pool, `INSERT INTO orders (id, user_id, status, amount_cents, created_at) VALUES ($1, 'u1', 'INVENTORY_RESERVED', 1, now() - interval '5 minutes')`, stuck)
	schematest.Exec(t, e.pool, `INSERT INTO outbox (topic, created_at) VALUES ('nowhere', now() - interval '10 minutes')`)
	rdb, _ := schematest.NewRedis(t)
	if err := rdb.Do(t.Context(), rdb.B().Hset().Key(bound(t, e)+"order:"+byStatus[event.StatusCancelled][0]).
		FieldValue().FieldValue("doc", "{}").FieldValue("status", "SHIPPED").FieldValue("rank", "4").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	schematest.Exec(t, e.pool, `UPDATE orders SET updated_at = now() - interval '1 hour' WHERE id = $1`, byStatus[event.StatusCancelled][0])

	// Cancellation's rules: a refund of a shipped order, an order both
	// shipped and withheld, a shipment after a recorded cancel, a refund of
	// a declined payment.
	if len(byStatus[event.StatusShipped]) < 3 {
		t.Fatalf("%d shipped orders, want 3 to corrupt", len(byStatus[event.StatusShipped]))
	}
	refundedShipped, withheldShipped, cancelledShipped := byStatus[event.StatusShipped][0], byStatus[event.StatusShipped][1], byStatus[event.StatusShipped][2]
	schematest.Exec(t, e.pool, `INSERT INTO refunds (order_id, id, payment_id, amount_cents)
		SELECT order_id, gen_random_uuid(), id, amount_cents FROM payments WHERE order_id = $1`, refundedShipped)
	schematest.Exec(t, e.pool, `INSERT INTO withheld_shipments (order_id) VALUES ($1)`, withheldShipped)
	schematest.Exec(t, e.pool, `UPDATE orders SET cancel_requested_at = now() WHERE id = $1`, cancelledShipped)
	schematest.Exec(t, e.pool, `INSERT INTO refunds (order_id, id, payment_id, amount_cents)
		SELECT order_id, gen_random_uuid(), id, amount_cents FROM payments WHERE order_id = $1`, declined)

	rep, err := check.Run(t.Context(), e.pool, check.Config{Deadline: time.Minute, Redis: rdb, Prefix: e.prefix})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		check.RuleStock:    "prod-mouse",
		check.RuleOnce:     shipped,
		check.RuleTrail:    shipped,
		check.RuleShipped:  declined,
		check.RuleReleased: declined,
		check.RuleStuck:    stuck.String(),
		check.RuleOutbox:   "outbox",
		check.RuleCache:    byStatus[event.StatusCancelled][0],
	}
	for rule, subject := range want {
		found := false
		for _, v := range rep.Violations {
			if v.Rule == rule && v.Subject == subject && v.Message != "" {
				found = true
			}
		}
		if !found {
			t.Errorf("no %q violation for %s; report:\n%s", rule, subject, rep.Text())
		}
	}
	for subject, msg := range map[string]string{
		refundedShipped:  "refunded and shipped",
		withheldShipped:  "both shipped and withheld",
		cancelledShipped: "shipped although its cancel was recorded",
		declined:         "refund does not match a completed payment",
	} {
		if !slices.ContainsFunc(rep.Violations, func(v check.Violation) bool {
			return v.Rule == check.RuleRefund && v.Subject == subject && strings.Contains(v.Message, msg)
		}) {
			t.Errorf("no %q violation %q for %s; report:\n%s", check.RuleRefund, msg, subject, rep.Text())
		}
	}
	out, err = runCLI(t, e.checkArgs(r.sys.Brokers())...)
	if err == nil || !strings.Contains(err.Error(), "violations") || !strings.Contains(out, "FAIL stock conservation") ||
		!strings.Contains(out, "prod-mouse: received") {
		t.Fatalf("check of a corrupted database: err %v, report:\n%s", err, out)
	}
}

// A record dead-lettered by an earlier version is listed with its reason
// and, replayed once the cause is fixed, processed.
func TestDeadLetterListAndReplay(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	brokers := strings.Join(r.sys.Brokers(), ",")
	// The order as the api wrote it; its OrderCreated ended in the DLQ.
	order := e.insertOrder()
	ev, err := event.New(event.OrderCreated, order, "api", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	rec := ev.Record(cfg.DLQTopic())
	rec.Headers = append(rec.Headers,
		kgo.RecordHeader{Key: saga.HeaderDLQReason, Value: []byte("database constraint violated (fixed in v2)")},
		kgo.RecordHeader{Key: saga.HeaderDLQParticipant, Value: []byte("inventory")},
		kgo.RecordHeader{Key: saga.HeaderDLQTopic, Value: []byte(cfg.Topic)},
		kgo.RecordHeader{Key: saga.HeaderDLQPartition, Value: []byte("0")},
		kgo.RecordHeader{Key: saga.HeaderDLQOffset, Value: []byte("41")},
	)
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), rec).FirstErr(); err != nil {
		t.Fatal(err)
	}
	out, err := runCLI(t, "dlq", "list", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--database-url", e.dbURL)
	if err != nil || !strings.Contains(out, "1 dead letters") || !strings.Contains(out, "fixed in v2") ||
		!strings.Contains(out, "inventory") || !strings.Contains(out, cfg.Topic+"/0@41") {
		t.Fatalf("dlq list: %v\n%s", err, out)
	}
	if _, err := runCLI(t, "dlq", "replay", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--record", "9@9"); err == nil || !strings.Contains(err.Error(), "no such dead letter") {
		t.Fatalf("replaying a record that is not there: %v", err)
	}
	if _, err := runCLI(t, "dlq", "replay", "--kafka-brokers", brokers, "--topic", cfg.Topic); err == nil || !strings.Contains(err.Error(), "--all") {
		t.Fatalf("replay without a choice: %v", err)
	}
	dls, err := saga.ReadDeadLetters(t.Context(), saga.Conn{Brokers: r.sys.Brokers()}, cfg.DLQTopic())
	if err != nil || len(dls) != 1 {
		t.Fatalf("%d dead letters (%v)", len(dls), err)
	}
	out, err = runCLI(t, "dlq", "replay", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--database-url", e.dbURL,
		"--record", strconv.Itoa(int(dls[0].Partition))+"@"+strconv.FormatInt(dls[0].Offset, 10))
	if err != nil || !strings.Contains(out, "replayed 1") {
		t.Fatalf("dlq replay: %v\n%s", err, out)
	}
	if got := r.await(t, order.String(), 20*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("replayed order ended %s", got.Status)
	}
}

// A dead letter older than the inboxes remember (the topic's retention plus
// the margin) is not replayed: participants that applied it may have
// pruned its id and would apply it twice.
func TestDeadLetterReplayRefusedPastInboxRetention(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	brokers := strings.Join(r.sys.Brokers(), ",")
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	day := "86400000"
	if _, err := kadm.NewClient(cl).AlterTopicConfigs(t.Context(), []kadm.AlterConfig{{Name: "retention.ms", Value: &day}}, cfg.Topic); err != nil {
		t.Fatal(err)
	}
	ev, err := event.New(event.OrderCreated, uuid.New(), "api", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	ev.Time = time.Now().Add(-30 * 24 * time.Hour)
	rec := ev.Record(cfg.DLQTopic())
	rec.Headers = append(rec.Headers,
		kgo.RecordHeader{Key: saga.HeaderDLQReason, Value: []byte("old")},
		kgo.RecordHeader{Key: saga.HeaderDLQParticipant, Value: []byte("inventory")},
		kgo.RecordHeader{Key: saga.HeaderDLQTopic, Value: []byte(cfg.Topic)},
		kgo.RecordHeader{Key: saga.HeaderDLQTime, Value: []byte(time.Now().Add(-30 * 24 * time.Hour).UTC().Format(time.RFC3339Nano))},
	)
	if err := cl.ProduceSync(t.Context(), rec).FirstErr(); err != nil {
		t.Fatal(err)
	}
	_, err = runCLI(t, "dlq", "replay", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--all", "--database-url", e.dbURL)
	if err == nil || !strings.Contains(err.Error(), "older than the inboxes keep event ids") || !strings.Contains(err.Error(), "not replaying it") {
		t.Fatalf("replaying a 30-day-old dead letter with a 1-day topic retention: %v", err)
	}
}

// bound is the test database's Redis key prefix, as the system uses it.
func bound(t *testing.T, e *env) string {
	t.Helper()
	p, err := statuscache.BoundPrefix(t.Context(), e.pool, e.prefix)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
