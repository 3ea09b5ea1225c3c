package app_test

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// deadLetters reads the dead-letter topic: participant -> reasons.
func deadLetters(t *testing.T, brokers []string, topic string) map[string][]string {
	t.Helper()
	dls, err := saga.ReadDeadLetters(t.Context(), saga.Conn{Brokers: brokers}, topic)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, d := range dls {
		out[d.Participant] = append(out[d.Participant], d.Reason)
	}
	return out
}

// awaitDeadLetter waits up to 30s for participant's first dead letter and
// returns its reason.
func awaitDeadLetter(t *testing.T, brokers []string, topic, participant string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if reasons := deadLetters(t, brokers, topic)[participant]; len(reasons) > 0 {
			return reasons[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing dead-lettered by %s within 30s", participant)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// awaitCommitted waits up to 30s until group has committed, on every
// partition of topic, the offset past the topic's last record as it is now:
// every record on the topic was delivered to the group and applied or
// skipped (a consumer commits only after its database commit).
func awaitCommitted(t *testing.T, brokers []string, topic, group string) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ends, err := adm.ListEndOffsets(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		offs, err := adm.FetchOffsets(t.Context(), group)
		if err != nil && !kerr.IsRetriable(err) {
			t.Fatal(err)
		}
		var behind []string
		ends.Each(func(end kadm.ListedOffset) {
			if o, ok := offs.Lookup(topic, end.Partition); end.Offset > 0 && (!ok || o.At < end.Offset) {
				behind = append(behind, fmt.Sprintf("partition %d: committed %d of %d", end.Partition, o.At, end.Offset))
			}
		})
		if len(behind) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %s not past the end of %s after 30s: %s", group, topic, strings.Join(behind, ", "))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A second OrderCreated with a new id for an order inventory already holds
// stock for (a unique violation, SQLSTATE 23505) is the record's fault: in
// a batch with five good orders, it alone is dead-lettered and the five are
// applied. Before, the error counted as transient and the batch, and the
// partition behind it, was retried forever.
func TestPermanentErrorDeadLettersOnlyItsRecord(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.Partitions = 1 // one partition, so inventory gets them all in one batch
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "payment", "delivery", "status")
	initial := r.stock(t)
	var ids []string
	for i := range 5 {
		ids = append(ids, r.order(t, "u1", "", mouse(1+i%2)).OrderID.String())
	}
	// The duplicate: the third order's OrderCreated again, with a new id.
	ev, err := event.New(event.OrderCreated, uuid.MustParse(ids[2]), "api", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.KafkaBrokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), ev.Record(cfg.Topic)).FirstErr(); err != nil {
		t.Fatal(err)
	}
	e.start(cfg, "inventory") // now inventory reads all six at once
	for _, id := range ids {
		if got := r.await(t, id, 30*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s", id, got.Status)
		}
	}
	e.awaitQuiet(30 * time.Second)
	dls := deadLetters(t, cfg.KafkaBrokers, cfg.DLQTopic())
	if len(dls["inventory"]) != 1 || !strings.Contains(dls["inventory"][0], "23505") {
		t.Fatalf("dead letters %v, want one from inventory for the unique violation (23505)", dls)
	}
	if code := deadletter.Code(dls["inventory"][0]); code != deadletter.CodeConstraintViolation {
		t.Fatalf("dead letter code %s, want %s", code, deadletter.CodeConstraintViolation)
	}
	// Stock was taken once per order, the duplicate's never: (the status
	// participant audits the duplicate, as it audits all that happened,
	// so prozess check's trail rule is not the measure here).
	if n := e.count(`SELECT count(*) FROM reservations WHERE order_id = $1`, ids[2]); n != 1 {
		t.Fatalf("%d reservations for the duplicated order", n)
	}
	if got, want := r.stock(t)["prod-mouse"], initial["prod-mouse"]-(1+2+1+2+1); got != want {
		t.Fatalf("prod-mouse stock %d, want %d", got, want)
	}
}

// An error of neither kind (a trigger raising one, SQLSTATE P0001) on one
// record is retried, alone, for --poison-after and then dead-lettered with
// the error; the orders around it ship meanwhile.
func TestUnclassifiedErrorStallsOnlyItsRecordForPoisonAfter(t *testing.T) {
	e := newEnv(t)
	schematest.Exec(t, e.pool, `
		CREATE FUNCTION carrier_outage() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF EXISTS (SELECT 1 FROM order_items WHERE order_id = NEW.order_id AND qty = 7) THEN
				RAISE EXCEPTION 'the carrier refuses parcels of seven';
			END IF;
			RETURN NEW;
		END $$`)
	schematest.Exec(t, e.pool, `CREATE TRIGGER carrier_outage BEFORE INSERT ON shipments FOR EACH ROW EXECUTE FUNCTION carrier_outage()`)
	cfg := e.config()
	cfg.PoisonAfter = 2 * time.Second
	r := e.start(cfg)
	bad := r.order(t, "u1", "", mouse(7)).OrderID.String()
	start := time.Now()
	var good []string
	for range 4 {
		good = append(good, r.order(t, "u1", "", mouse(1)).OrderID.String())
	}
	for _, id := range good {
		if got := r.await(t, id, 30*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s", id, got.Status)
		}
	}
	reason := awaitDeadLetter(t, r.sys.Brokers(), cfg.DLQTopic(), "delivery")
	took := time.Since(start)
	if !strings.Contains(reason, "the carrier refuses parcels of seven") || !strings.Contains(reason, "neither transient") {
		t.Fatalf("dead letter reason %q", reason)
	}
	if code := deadletter.Code(reason); code != deadletter.CodeKeptFailing {
		t.Fatalf("dead letter code %s, want %s (reason %q)", code, deadletter.CodeKeptFailing, reason)
	}
	if took < cfg.PoisonAfter {
		t.Fatalf("dead-lettered after %s, before --poison-after %s", took, cfg.PoisonAfter)
	}
	var o struct{ Status event.Status }
	r.getJSON(t, "/orders/"+bad, &o)
	if o.Status != event.StatusPaid {
		t.Fatalf("the failing order is %s, want PAID (its OrderShipped never written)", o.Status)
	}
}

// End to end with nothing built by hand: a bad deploy (a CHECK constraint
// no shipment can meet) makes delivery reject a record, SQLSTATE 23514; the
// running system dead-letters it; the cause is fixed; `dlq replay`
// re-drives it to delivery, which applies it (the inbox knew it only as
// dead-lettered), and the order ships. Replaying it again changes nothing.
func TestDeadLetterReplayReDrivesTheParticipantThatRejectedIt(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	schematest.Exec(t, e.pool, `ALTER TABLE shipments ADD CONSTRAINT bad_deploy CHECK (carrier <> 'prozess-post')`)
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	if reason := awaitDeadLetter(t, r.sys.Brokers(), cfg.DLQTopic(), "delivery"); !strings.Contains(reason, "23514") {
		t.Fatalf("dead letter reason %q, want the check violation", reason)
	}
	schematest.Exec(t, e.pool, `ALTER TABLE shipments DROP CONSTRAINT bad_deploy`)
	brokers := strings.Join(r.sys.Brokers(), ",")
	replay := func(want string) {
		t.Helper()
		out, err := runCLI(t, "dlq", "replay", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--all", "--database-url", e.dbURL)
		if err != nil || !strings.Contains(out, want) {
			t.Fatalf("dlq replay: %v\n%s", err, out)
		}
	}
	replay("replayed 1")
	if got := r.await(t, id, 30*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("replayed order ended %s", got.Status)
	}
	e.awaitQuiet(20 * time.Second)
	events := e.count(`SELECT count(*) FROM order_events WHERE order_id = $1`, id)
	delivery := r.sys.Stats()["delivery"]
	applied, skipped := delivery.Applied.Load(), delivery.Duplicates.Load()
	// --all skips what it replayed before: nothing goes out again.
	replay("skipped 1 dead letters already replayed")
	// A copy all the same (an older prozess's replay --all sent one, or an
	// operator produced it by hand): delivery's inbox must skip it.
	dls, err := saga.ReadDeadLetters(t.Context(), saga.Conn{Brokers: r.sys.Brokers()}, cfg.DLQTopic())
	if err != nil || len(dls) != 1 {
		t.Fatalf("%d dead letters (%v)", len(dls), err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), dls[0].Original()).FirstErr(); err != nil {
		t.Fatal(err)
	}
	// Wait until delivery's group has committed past the copy, so it was
	// delivered, and skipped by the inbox (delivery no longer knows it as
	// dead).
	awaitCommitted(t, r.sys.Brokers(), cfg.Topic, cfg.GroupPrefix+"delivery")
	e.awaitQuiet(20 * time.Second)
	if got := delivery.Duplicates.Load() - skipped; got != 1 {
		t.Fatalf("delivery skipped %d records on the second replay, want 1", got)
	}
	if got := delivery.Applied.Load() - applied; got != 0 {
		t.Fatalf("delivery applied %d records on the second replay, want none", got)
	}
	if n := e.count(`SELECT count(*) FROM shipments WHERE order_id = $1`, id); n != 1 {
		t.Fatalf("%d shipments after two replays", n)
	}
	if n := e.count(`SELECT count(*) FROM order_events WHERE order_id = $1`, id); n != events {
		t.Fatalf("%d audit events after the second replay, %d before", n, events)
	}
	if n := len(deadLetters(t, r.sys.Brokers(), cfg.DLQTopic())["delivery"]); n != 1 {
		t.Fatalf("%d dead letters from delivery, want still 1", n)
	}
}

// The poison the design review listed, in one batch with good orders: a
// record with a NUL byte and bytes that are not UTF-8 in a header (and an
// unknown schema version), and events whose payload strings hold a NUL or
// invalid UTF-8, which PostgreSQL refuses (22P05, 22021). Each is
// dead-lettered, the good orders are applied, and the dead letter carries
// the original headers byte for byte.
func TestListedPoisonIsDeadLetteredByteExactWhileTheBatchGoesOn(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.Partitions = 1
	cfg.KafkaBrokers = e.broker()
	api := e.start(cfg, "api")
	initial := api.stock(t)
	var good []string
	for range 3 {
		good = append(good, api.order(t, "u1", "", mouse(1)).OrderID.String())
	}
	odd := kgo.RecordHeader{Key: "x-note", Value: []byte{'a', 0x00, 0xff, 0xfe, 'z'}}
	badVersion := sampleFor(t, cfg.Topic, event.OrderCreated)
	badVersion.Headers = append(badVersion.Headers, odd)
	setHeader(badVersion, "ce_schemaversion", "99")
	shipped := func(tracking string) *kgo.Record {
		ev, err := event.New(event.OrderShipped, uuid.New(), "delivery", event.Shipped{ShipmentID: uuid.New(), Carrier: "prozess-post", Tracking: "PZ1"})
		if err != nil {
			t.Fatal(err)
		}
		rec := ev.Record(cfg.Topic)
		rec.Value = []byte(strings.Replace(string(rec.Value), `"PZ1"`, tracking, 1))
		return rec
	}
	nul := shipped(`"PZ\u0000"`)
	latin1 := shipped("\"PZ\xff\"")
	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.KafkaBrokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), badVersion, nul, latin1).FirstErr(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		good = append(good, api.order(t, "u1", "", mouse(1)).OrderID.String())
	}
	e.start(cfg, "inventory", "payment", "delivery", "status")
	for _, id := range good {
		if got := api.await(t, id, 30*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s", id, got.Status)
		}
	}
	e.awaitQuiet(30 * time.Second)
	dls, err := saga.ReadDeadLetters(t.Context(), saga.Conn{Brokers: cfg.KafkaBrokers}, cfg.DLQTopic())
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[string]string{} // participant/origin offset -> reason
	for _, d := range dls {
		reasons[d.Participant+"/"+d.Headers[saga.HeaderDLQOffset]] = d.Reason
		if d.Headers[saga.HeaderDLQOffset] == "3" { // badVersion: after the 3 good OrderCreated
			if got := d.Headers["x-note"]; got != string(odd.Value) {
				t.Errorf("dead letter's x-note header %q, want %q byte for byte", got, odd.Value)
			}
			if orig := d.Original(); !bytes.Equal(orig.Value, badVersion.Value) || !strings.Contains(string(event.EncodeHeaders(orig.Headers)), string(odd.Value)) {
				t.Error("the replayable original differs from the record that failed")
			}
		}
	}
	for key, want := range map[string]string{"status/3": "schema version", "inventory/3": "schema version", "status/4": "22P05", "status/5": "22021"} {
		if got, ok := reasons[key]; !ok || !strings.Contains(got, want) {
			t.Errorf("dead letter %s: %q, want one mentioning %q (all: %v)", key, got, want, reasons)
		}
	}
	// What an order's owner is told of each (GET /orders/{id}'s code).
	for key, want := range map[string]string{"status/3": deadletter.CodeUnsupportedVersion, "inventory/3": deadletter.CodeUnsupportedVersion,
		"status/4": deadletter.CodeDataError, "status/5": deadletter.CodeDataError} {
		if got := deadletter.Code(reasons[key]); got != want {
			t.Errorf("dead letter %s: code %s, want %s (reason %q)", key, got, want, reasons[key])
		}
	}
	if len(dls) != 4 {
		t.Errorf("%d dead letters, want exactly the 4 above: %v", len(dls), reasons)
	}
	e.assertExactlyOnce(initial, api.stock(t))
}

// sampleFor is a valid record of type typ on topic.
func sampleFor(t *testing.T, topic string, typ event.Type) *kgo.Record {
	t.Helper()
	r := sample(t, typ)
	r.Topic = topic
	return r
}

func setHeader(r *kgo.Record, key, value string) {
	for i, h := range r.Headers {
		if h.Key == key {
			r.Headers[i].Value = []byte(value)
			return
		}
	}
	r.Headers = append(r.Headers, kgo.RecordHeader{Key: key, Value: []byte(value)})
}
