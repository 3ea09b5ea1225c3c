package app_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// postJSON POSTs body (none when "") with key and returns the status and
// body.
func (r *running) postJSON(t *testing.T, path, key, body string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, r.url+path, strings.NewReader(body))
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// bulk POSTs a bulk re-drive as admin, checks request and answer against
// the OpenAPI document, and decodes the answer.
func (r *running) bulk(t *testing.T, c *contract, path, body string) deadletter.Bulk {
	t.Helper()
	b := c.check(t, r.url, call{name: path, method: http.MethodPost, path: path, key: r.e.keyFor("admin"), body: body, status: http.StatusOK})
	var res deadletter.Bulk
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("POST %s %s: %s (%v)", path, body, b, err)
	}
	return res
}

// awaitOutbox waits until the relay has published everything, and a
// moment more for the participants to apply it.
func (e *env) awaitOutbox(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for e.count(`SELECT count(*) FROM outbox`) > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the outbox has not drained in 20 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second)
}

// redriveState is what a refused request must leave as it was: the open dead
// letters, the audit rows, the outbox and the parked records.
func (e *env) redriveState() string {
	e.t.Helper()
	var s string
	err := e.pool.QueryRow(e.t.Context(), `SELECT concat_ws(' ',
		(SELECT string_agg(id::text, ',' ORDER BY id) FROM dead_letters WHERE replayed_at IS NULL),
		(SELECT count(*) FROM redrives), (SELECT count(*) FROM outbox), (SELECT string_agg(id::text, ',' ORDER BY id) FROM parked))`).Scan(&s)
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// A filtered bulk re-drive of dead letters, through the admin endpoint and
// `prozess dlq replay`: a bad deploy makes delivery dead-letter four
// orders' PaymentCompleted (and status dead-letters a poison record); the
// filter (participant, reason text, time window) matches three of them,
// a dry run lists two of those and changes nothing, the run that follows
// (with the dry run's through_id) re-drives exactly those two, once: the
// third, dead-lettered after the dry run, is left alone, and the run
// repeated re-drives nothing. Non-admins get 403, bad filters 400 JSON,
// and neither changes anything. The CLI's dry run and run do the same
// from the command line; each run leaves an audit row naming who.
func TestBulkRedriveOfDeadLettersByFilter(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	doc := loadContract(t, r.url)
	schematest.Exec(t, e.pool, `ALTER TABLE shipments ADD CONSTRAINT bad_deploy CHECK (carrier <> 'prozess-post')`)
	dead := func(user string) (string, deadletter.Entry) {
		id := r.order(t, user, "", mouse(1)).OrderID.String()
		return id, r.awaitOrderDeadLetter(t, id, "delivery")
	}
	a, dlA := dead("u1")
	time.Sleep(20 * time.Millisecond)
	since := time.Now().UTC()
	b, dlB := dead("u1")
	c, dlC := dead("u2")
	// A poison record status dead-letters: another participant, another
	// reason.
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), &kgo.Record{Topic: cfg.Topic, Key: []byte(a), Value: []byte("{not json"),
		Headers: []kgo.RecordHeader{{Key: "ce_specversion", Value: []byte("1.0")}, {Key: "ce_type", Value: []byte("OrderShipped")}}}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	poison := r.awaitOrderDeadLetter(t, a, "status")
	filter := `{"participant":"delivery","reason":"BAD_DEPLOY","since":"` + since.Format(time.RFC3339Nano) + `"}`
	admin, u1 := e.keyFor("admin"), e.keyFor("u1")
	const path = "/admin/dead-letters/replay"

	// The relay may still be publishing the poison's dead-letter record
	// (Apache Kafka in CI's Kafka step: the outbox went 2 to 1 meanwhile).
	e.awaitOutbox(t)
	before := e.redriveState()
	for _, tc := range []struct {
		name, key, body string
		status          int
		code            string
	}{
		{"a user", u1, `{"filter":` + filter + `,"dry_run":false}`, 403, "forbidden"},
		{"a user's dry run", u1, `{"filter":` + filter + `,"dry_run":true}`, 403, "forbidden"},
		{"no dry_run", admin, `{"filter":` + filter + `}`, 400, "dry_run_required"},
		{"unknown participant", admin, `{"filter":{"participant":"deliveryy"},"dry_run":false}`, 400, "invalid_filter"},
		{"bad since", admin, `{"filter":{"since":"yesterday"},"dry_run":false}`, 400, "invalid_filter"},
		{"window backwards", admin, `{"filter":{"since":"2026-01-02T00:00:00Z","until":"2026-01-01T00:00:00Z"},"dry_run":false}`, 422, "invalid_filter"},
		{"empty until", admin, `{"filter":{"until":""},"dry_run":false}`, 400, "invalid_json"},
		{"empty participant", admin, `{"filter":{"participant":""},"dry_run":true}`, 400, "invalid_json"},
		{"null until", admin, `{"filter":{"until":null},"dry_run":false}`, 400, "invalid_json"},
		{"null filter", admin, `{"filter":null,"dry_run":false}`, 400, "invalid_json"},
		{"null limit", admin, `{"dry_run":false,"limit":null}`, 400, "invalid_json"},
		{"bad order id", admin, `{"filter":{"order_id":"42"},"dry_run":false}`, 400, "invalid_filter"},
		{"bad ids", admin, `{"filter":{"ids":[0]},"dry_run":false}`, 400, "invalid_filter"},
		{"bad event type", admin, `{"filter":{"event_type":"Order Shipped"},"dry_run":false}`, 400, "invalid_filter"},
		{"unknown field", admin, `{"filter":{"participant":"delivery","status":"PAID"},"dry_run":false}`, 400, "invalid_json"},
		{"limit", admin, `{"filter":{},"dry_run":false,"limit":100000}`, 400, "invalid_limit"},
		{"limit 0", admin, `{"filter":{},"dry_run":false,"limit":0}`, 400, "invalid_limit"},
		{"not json", admin, `{"filter":`, 400, "invalid_json"},
	} {
		code, body := r.postJSON(t, path, tc.key, tc.body)
		var er struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		if code != tc.status || json.Unmarshal(body, &er) != nil || er.Error.Code != tc.code || er.Error.Message == "" {
			t.Errorf("%s: %d %s, want %d %s", tc.name, code, body, tc.status, tc.code)
		}
	}
	if after := e.redriveState(); after != before {
		t.Fatalf("refused requests changed something: %q, then %q", before, after)
	}

	// The dry run: B and C, nothing changed.
	dry := r.bulk(t, doc, path, `{"filter":`+filter+`,"dry_run":true}`)
	ids := func(es []deadletter.Entry) []int64 {
		var out []int64
		for _, d := range es {
			out = append(out, d.ID)
		}
		return out
	}
	if !dry.DryRun || dry.Count != 2 || dry.Matched != 2 || dry.More || dry.RedriveID != 0 ||
		!slices.Equal(ids(dry.DeadLetters), []int64{dlB.ID, dlC.ID}) || dry.ThroughID != dlC.ID {
		t.Fatalf("dry run: %+v, want dead letters %d and %d", dry, dlB.ID, dlC.ID)
	}
	if after := e.redriveState(); after != before {
		t.Fatalf("the dry run changed something: %q, then %q", before, after)
	}
	// One more matching dead letter after the dry run; then the cause is
	// fixed and the dry run's list re-driven.
	d, dlD := dead("u2")
	schematest.Exec(t, e.pool, `ALTER TABLE shipments DROP CONSTRAINT bad_deploy`)
	run := `{"filter":` + strings.TrimSuffix(filter, "}") + `,"through_id":` + strconv.FormatInt(dry.ThroughID, 10) + `},"dry_run":false}`
	done := r.bulk(t, doc, path, run)
	if done.DryRun || done.Count != 2 || done.RedriveID == 0 || !strings.HasPrefix(done.By, "admin key ") ||
		!slices.Equal(ids(done.DeadLetters), []int64{dlB.ID, dlC.ID}) {
		t.Fatalf("the run: %+v, want dead letters %d and %d re-driven", done, dlB.ID, dlC.ID)
	}
	for _, id := range []string{b, c} {
		if o := r.await(t, id, 30*time.Second); o.Status != event.StatusShipped {
			t.Fatalf("re-driven order %s ended %s", id, o.Status)
		}
	}
	again := r.bulk(t, doc, path, run)
	if again.Count != 0 || again.Matched != 0 || again.RedriveID != 0 {
		t.Fatalf("the run repeated: %+v, want nothing", again)
	}
	e.awaitOutbox(t) // A and D stay PAID with their dead letters: not quiet
	open := e.count(`SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL AND id = ANY($1)`, []int64{dlA.ID, dlD.ID, poison.ID})
	if open != 3 || e.count(`SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL`) != 3 {
		t.Fatalf("A, D and the poison record should be the open dead letters")
	}
	for _, id := range []string{b, c} {
		if n := e.count(`SELECT count(*) FROM shipments WHERE order_id = $1`, id); n != 1 {
			t.Fatalf("order %s has %d shipments", id, n)
		}
		if n := e.count(`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = $2 AND (payload->>'redrive_id')::bigint = $3`,
			id, deadletter.TrailType, done.RedriveID); n != 1 {
			t.Fatalf("order %s's trail has %d entries for re-drive #%d", id, n, done.RedriveID)
		}
	}
	if n := e.count(`SELECT count(*) FROM redrives WHERE id = $1 AND kind = 'dead_letters' AND count = 2 AND ids = $2 AND done_by = $3
		AND filter->>'participant' = 'delivery'`, done.RedriveID, []int64{dlB.ID, dlC.ID}, done.By); n != 1 {
		t.Fatal("no audit row for the run")
	}

	// Two admins at once, for D: re-driven once between them.
	var wg sync.WaitGroup
	counts := make([]int, 2)
	for i := range counts {
		wg.Go(func() {
			code, body := r.postJSON(t, path, admin, `{"filter":{"order_id":"`+d+`","participant":"delivery"},"dry_run":false}`)
			var res deadletter.Bulk
			if code != 200 || json.Unmarshal(body, &res) != nil {
				t.Errorf("concurrent run: %d %s", code, body)
			}
			counts[i] = res.Count
		})
	}
	wg.Wait()
	if counts[0]+counts[1] != 1 {
		t.Fatalf("two concurrent runs re-drove %v of one dead letter", counts)
	}
	if o := r.await(t, d, 30*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("order %s ended %s", d, o.Status)
	}

	// The command line: a bad flag is named; the dry run lists A alone
	// (the poison record is status's), the run re-drives it, once.
	brokers := strings.Join(r.sys.Brokers(), ",")
	cli := func(args ...string) (string, error) {
		return runCLI(t, append([]string{"dlq", "replay", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--database-url", e.dbURL}, args...)...)
	}
	before = e.redriveState()
	for flag, args := range map[string][]string{
		"--since":       {"--since", "yesterday"},
		"--participant": {"--participant", "nope"},
		"--limit":       {"--participant", "delivery", "--limit", "0"},
		"--record":      {"--participant", "delivery", "--all"},
	} {
		if _, err := cli(args...); err == nil || !strings.Contains(err.Error(), flag) {
			t.Errorf("dlq replay %v: %v, want an error naming %s", args, err, flag)
		}
	}
	if after := e.redriveState(); after != before {
		t.Fatalf("refused commands changed something: %q, then %q", before, after)
	}
	out, err := cli("--participant", "delivery", "--dry-run")
	if err != nil || !strings.Contains(out, "dry run: 1 dead letters match") || !strings.Contains(out, "dead letter #"+strconv.FormatInt(dlA.ID, 10)) {
		t.Fatalf("dlq replay --dry-run: %v\n%s", err, out)
	}
	if after := e.redriveState(); after != before {
		t.Fatalf("the CLI's dry run changed something: %q, then %q", before, after)
	}
	out, err = cli("--participant", "delivery", "--operator", "alice")
	if err != nil || !strings.Contains(out, "re-drove 1 dead letters") || !strings.Contains(out, "operator alice") {
		t.Fatalf("dlq replay --participant delivery: %v\n%s", err, out)
	}
	if o := r.await(t, a, 30*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("order %s ended %s", a, o.Status)
	}
	out, err = cli("--participant", "delivery")
	if err != nil || !strings.Contains(out, "nothing matches") {
		t.Fatalf("dlq replay again: %v\n%s", err, out)
	}
	if n := e.count(`SELECT count(*) FROM redrives WHERE done_by = 'prozess dlq replay (operator alice)' AND ids = $1`, []int64{dlA.ID}); n != 1 {
		t.Fatal("no audit row for the CLI's run")
	}
	e.awaitQuiet(20 * time.Second)
	if n := e.count(`SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL`); n != 1 {
		t.Fatalf("%d open dead letters, want the poison record's alone", n)
	}
	for _, id := range []string{a, b, c, d} {
		if n := e.count(`SELECT count(*) FROM shipments WHERE order_id = $1`, id); n != 1 {
			t.Fatalf("order %s has %d shipments", id, n)
		}
	}
}

// Parked records by filter, through POST /admin/parked/replay and `dlq
// unpark`: the broker refuses the saga's records as too large for a
// while, so three orders' OrderCreated are parked; an admin's dry run by
// order lists one, the run sends it again (once: the repeat sends
// nothing); the CLI's dry run by event type lists the other two and its
// run sends them; every order ships. A parked record of another
// participant and type is matched by neither and stays parked.
func TestBulkUnparkByFilter(t *testing.T) {
	if sagatest.Real() {
		t.Skip("kfake's fault injection is not part of a real cluster; parking on a real cluster is in TestParkedRecordsAreSentAgain's family")
	}
	e := newEnv(t)
	broker, err := saga.StartBroker("127.0.0.1:0", t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(broker.Close)
	cfg := e.config()
	cfg.KafkaBrokers = broker.ListenAddrs()
	r := e.start(cfg)
	doc := loadContract(t, r.url)
	if o := r.await(t, r.order(t, "u1", "", mouse(1)).OrderID.String(), 30*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("first order ended %s", o.Status)
	}
	// A record of inventory's the broker refuses on another topic (too
	// large for it): parked, and never matched by the filters below.
	schematest.Exec(t, e.pool, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, 'big', convert_to($2, 'UTF8'),
		'[["ce_type","InventoryReserved"],["ce_source","/prozess/inventory"]]')`, cfg.DLQTopic(), strings.Repeat("x", 2<<20))
	h := broker.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: cfg.Topic, Err: kerr.MessageTooLarge, Count: -1})
	var orders []string
	for _, u := range []string{"u1", "u2", "u2"} {
		orders = append(orders, r.order(t, u, "", mouse(1)).OrderID.String())
	}
	deadline := time.Now().Add(30 * time.Second)
	for e.count(`SELECT count(*) FROM parked`) < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("%d records parked after 30 s, want 4", e.count(`SELECT count(*) FROM parked`))
		}
		time.Sleep(50 * time.Millisecond)
	}
	h.Remove()
	const path = "/admin/parked/replay"
	e.awaitOutbox(t)
	before := e.redriveState()
	for _, body := range []string{`{"filter":{"order_id":"nope"},"dry_run":true}`, `{"filter":{"participant":"apii"},"dry_run":false}`, `{"dry_run":"yes"}`} {
		if code, b := r.postJSON(t, path, e.keyFor("admin"), body); code != 400 || !strings.Contains(string(b), `"error"`) {
			t.Errorf("%s: %d %s, want 400", body, code, b)
		}
	}
	if code, b := r.postJSON(t, path, e.keyFor("u1"), `{"filter":{},"dry_run":false}`); code != 403 {
		t.Errorf("a user's bulk unpark: %d %s, want 403", code, b)
	}
	if after := e.redriveState(); after != before {
		t.Fatalf("refused requests changed something: %q, then %q", before, after)
	}
	byOrder := `{"filter":{"order_id":"` + orders[0] + `","participant":"api","event_type":"OrderCreated","reason":"too_large"},"dry_run":%s}`
	dry := r.bulk(t, doc, path, strings.Replace(byOrder, "%s", "true", 1))
	if dry.Count != 1 || len(dry.Parked) != 1 || dry.Parked[0].OrderID == nil || dry.Parked[0].OrderID.String() != orders[0] {
		t.Fatalf("dry run: %+v", dry)
	}
	if after := e.redriveState(); after != before {
		t.Fatalf("the dry run changed something: %q, then %q", before, after)
	}
	done := r.bulk(t, doc, path, strings.Replace(byOrder, "%s", "false", 1))
	if done.Count != 1 || done.RedriveID == 0 || done.Parked[0].ParkedID != dry.Parked[0].ParkedID || done.Parked[0].OutboxID == 0 {
		t.Fatalf("the run: %+v", done)
	}
	if again := r.bulk(t, doc, path, strings.Replace(byOrder, "%s", "false", 1)); again.Count != 0 || again.RedriveID != 0 {
		t.Fatalf("the run repeated: %+v", again)
	}
	if o := r.await(t, orders[0], 30*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("order %s ended %s", orders[0], o.Status)
	}
	cli := func(args ...string) (string, error) {
		return runCLI(t, append([]string{"dlq", "unpark", "--database-url", e.dbURL}, args...)...)
	}
	if _, err := cli("--since", "soon"); err == nil || !strings.Contains(err.Error(), "--since") {
		t.Errorf("dlq unpark --since soon: %v", err)
	}
	out, err := cli("--event-type", "OrderCreated", "--dry-run")
	if err != nil || !strings.Contains(out, "dry run: 2 parked records match") || strings.Count(out, "would be sent again") != 2 {
		t.Fatalf("dlq unpark --dry-run: %v\n%s", err, out)
	}
	out, err = cli("--participant", "inventory", "--dry-run")
	if err != nil || !strings.Contains(out, "dry run: 1 parked records match") || !strings.Contains(out, "(InventoryReserved for "+cfg.DLQTopic()) {
		t.Fatalf("dlq unpark --participant inventory --dry-run: %v\n%s", err, out)
	}
	out, err = cli("--event-type", "OrderCreated", "--operator", "bob")
	if err != nil || !strings.Contains(out, "unparked 2 records") || !strings.Contains(out, "operator bob") {
		t.Fatalf("dlq unpark --event-type: %v\n%s", err, out)
	}
	if out, err := cli("--event-type", "OrderCreated"); err != nil || !strings.Contains(out, "nothing matches") {
		t.Fatalf("dlq unpark again: %v\n%s", err, out)
	}
	for _, id := range orders {
		if o := r.await(t, id, 30*time.Second); o.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s", id, o.Status)
		}
		if n := e.count(`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = $2`, id, deadletter.TrailType); n != 1 {
			t.Fatalf("order %s has %d re-drive entries in its trail", id, n)
		}
	}
	if n := e.count(`SELECT count(*) FROM parked WHERE key = 'big'`); n != 1 || e.count(`SELECT count(*) FROM parked`) != 1 {
		t.Fatalf("the record no filter matched should be the only one parked")
	}
	if n := e.count(`SELECT count(*) FROM redrives WHERE kind = 'parked'`); n != 2 {
		t.Fatalf("%d audit rows for parked records, want 2", n)
	}
}
