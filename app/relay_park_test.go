package app_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

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
