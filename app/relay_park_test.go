package app_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// One outbox record the broker refuses for good (2 MB, over the broker's
// message.max.bytes, as a dead letter copying a large record would be) is
// parked with the broker's error (shown by dlq list, a metric and an
// admin's live page); every other record is published once and deleted,
// and the saga goes on. Before, the relay retried the whole batch
// forever, republishing everything else each round.
func TestOversizedOutboxRecordIsParked(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	big := strings.Repeat("x", 2<<20)
	schematest.Exec(t, e.pool, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, 'big', convert_to($2, 'UTF8'), '[["ce_type","OrderCreated"]]')`,
		cfg.DLQTopic(), big)
	var ids []string
	for i := range 5 {
		ids = append(ids, r.order(t, "u1", "", mouse(1+i%2)).OrderID.String())
	}
	for _, id := range ids {
		if got := r.await(t, id, 30*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s with a refused record in the outbox", id, got.Status)
		}
	}
	e.awaitQuiet(30 * time.Second)
	if n := e.count(`SELECT count(*) FROM parked WHERE key = 'big' AND error LIKE '%MESSAGE_TOO_LARGE%'`); n != 1 {
		t.Fatalf("%d parked rows for the 2 MB record, want 1 with the broker's MESSAGE_TOO_LARGE", n)
	}
	// Published exactly once: the topic holds as many records as there are
	// events (nothing republished because of the refused one).
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(t.Context(), cfg.Topic)
	if err != nil {
		t.Fatal(err)
	}
	var onTopic int64
	ends.Each(func(o kadm.ListedOffset) { onTopic += o.Offset })
	if events := e.count(`SELECT count(*) FROM order_events`); onTopic != events {
		t.Fatalf("%d records on the topic for %d events: records were published more than once", onTopic, events)
	}
	out, err := runCLI(t, "dlq", "list", "--kafka-brokers", strings.Join(r.sys.Brokers(), ","), "--topic", cfg.Topic, "--database-url", e.dbURL)
	if err != nil || !strings.Contains(out, "1 parked outbox records") || !strings.Contains(out, "MESSAGE_TOO_LARGE") {
		t.Fatalf("dlq list: %v\n%s", err, out)
	}
	// An admin's live page shows it (in the stream's first snapshot).
	name, data := openStream(t, r.url, e.keyFor("admin")).next(t)
	var snap api.LiveSnapshot
	if err := json.Unmarshal(data, &snap); err != nil || name != "snapshot" {
		t.Fatalf("first stream message %s %s: %v", name, data, err)
	}
	if len(snap.Parked) != 1 || snap.Parked[0].Topic != cfg.DLQTopic() || !strings.Contains(snap.Parked[0].Error, "MESSAGE_TOO_LARGE") {
		t.Fatalf("admin snapshot's parked records: %+v", snap.Parked)
	}
	res, err := http.Get("http://" + r.sys.AdminAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	m, _ := io.ReadAll(res.Body)
	if !strings.Contains(string(m), "prozess_relay_parked_records 1") {
		t.Error("metrics do not show the parked record")
	}
}

// Parked records are sent again once their cause is fixed, by the CLI
// (`dlq unpark`) and by an admin (POST /admin/parked/{id}/replay): each
// moves its row back into the outbox, in one transaction with an entry on
// the order's trail, and the order finishes. Here the broker refuses every
// saga record as too large (a broker's message.max.bytes set too low),
// then is fixed.
func TestParkedRecordsAreSentAgain(t *testing.T) {
	e := newEnv(t)
	r, b, cfg, _ := faultable(t, e)
	c := loadContract(t, r.url)
	h := b.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: cfg.Topic, Err: kerr.MessageTooLarge, Count: -1})
	byCLI := r.order(t, "u1", "", mouse(1)).OrderID.String()
	byAPI := r.order(t, "u2", "", mouse(1)).OrderID.String()
	parkedID := func(order string) int64 {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			var id int64
			err := e.pool.QueryRow(t.Context(), `SELECT id FROM parked WHERE key = $1`, []byte(order)).Scan(&id)
			if err == nil {
				return id
			}
			if time.Now().After(deadline) {
				t.Fatalf("the OrderCreated of %s not parked after 30 s: %v", order, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	cliID, apiID := parkedID(byCLI), parkedID(byAPI)
	h.Remove() // the cause fixed
	if _, err := runCLI(t, "dlq", "unpark", "--database-url", e.dbURL); err == nil || !strings.Contains(err.Error(), "--all") {
		t.Fatalf("unpark without a choice: %v", err)
	}
	out, err := runCLI(t, "dlq", "unpark", strconv.FormatInt(cliID, 10), "--database-url", e.dbURL)
	if err != nil || !strings.Contains(out, "unparked 1 records") {
		t.Fatalf("dlq unpark %d: %v\n%s", cliID, err, out)
	}
	if got := r.await(t, byCLI, 30*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order %s ended %s after dlq unpark", byCLI, got.Status)
	}
	if _, err := runCLI(t, "dlq", "unpark", strconv.FormatInt(cliID, 10), "--database-url", e.dbURL); err == nil || !strings.Contains(err.Error(), "no such parked record") {
		t.Fatalf("unparking %d twice: %v", cliID, err)
	}
	path := "/admin/parked/" + strconv.FormatInt(apiID, 10) + "/replay"
	c.check(t, r.url, call{name: "unpark as a user", method: "POST", path: path, key: e.keyFor("u2"), status: 404})
	body := c.check(t, r.url, call{name: "unpark", method: "POST", path: path, key: e.keyFor("admin"), status: 200})
	var res api.UnparkResponse
	if err := json.Unmarshal(body, &res); err != nil || res.Parked.OrderID == nil || res.Parked.OrderID.String() != byAPI ||
		res.Parked.Type != string(event.OrderCreated) || !strings.Contains(res.Parked.Reason, "MESSAGE_TOO_LARGE") {
		t.Fatalf("unpark answered %s (%v)", body, err)
	}
	c.check(t, r.url, call{name: "unpark again", method: "POST", path: path, key: e.keyFor("admin"), status: 404})
	if got := r.await(t, byAPI, 30*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order %s ended %s after the admin's unpark", byAPI, got.Status)
	}
	for _, id := range []string{byCLI, byAPI} {
		if n := e.count(`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'DeadLetterReplayed' AND payload->>'parked_id' IS NOT NULL`, id); n != 1 {
			t.Fatalf("order %s has %d trail entries for its unparked record, want 1", id, n)
		}
	}
	e.awaitQuiet(30 * time.Second)
	if n := e.count(`SELECT count(*) FROM parked`); n != 0 {
		t.Fatalf("%d records still parked", n)
	}
	e.checkClean(t, r.sys.Brokers())
	out, err = runCLI(t, "dlq", "unpark", "--all", "--database-url", e.dbURL)
	if err != nil || !strings.Contains(out, "nothing parked") {
		t.Fatalf("dlq unpark --all with nothing parked: %v\n%s", err, out)
	}
}
