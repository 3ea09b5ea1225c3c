package api_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
	"github.com/prozess/prozess/schema/schematest"
)

// createOrder places one order as user and returns its id.
func createOrder(t *testing.T, ts *testServer, user string) uuid.UUID {
	t.Helper()
	code, b, _ := ts.do(t, http.MethodPost, "/orders", user, `{"items":[{"product_id":"prod-mouse","qty":1}]}`)
	var c api.CreateResponse
	if code != http.StatusCreated || json.Unmarshal(b, &c) != nil {
		t.Fatalf("%s ordering: %d %s", user, code, b)
	}
	return c.OrderID
}

// Another user's order is 404 on the PostgreSQL path too, not only from
// the status cache: with the order's cache entry held (as for an order
// with a dead letter) or gone (expired, evicted, Redis restarted), every
// read goes to PostgreSQL, and the owner check there is what stands
// between u2 and u1's order.
func TestAnotherUsersOrderIs404FromPostgreSQL(t *testing.T) {
	ts := server(t)
	cache := statuscache.New(ts.rdb, ts.prefix)
	read := func(id uuid.UUID, user string) (int, string, string) {
		t.Helper()
		code, b, hdr := ts.do(t, http.MethodGet, "/orders/"+id.String(), user, "")
		return code, hdr.Get("X-Prozess-Source"), string(b)
	}

	// Held: no read of it is answered from the cache.
	held := createOrder(t, ts, "u1")
	if code, src, b := read(held, "u1"); code != 200 || src != "cache" {
		t.Fatalf("u1 reading its new order: %d from %q %s, want 200 from the cache", code, src, b)
	}
	if err := cache.Hold(t.Context(), []uuid.UUID{held}); err != nil {
		t.Fatal(err)
	}
	if code, src, b := read(held, "u1"); code != 200 || src != "database" {
		t.Fatalf("u1 reading its held order: %d from %q %s, want 200 from the database", code, src, b)
	}
	if code, _, b := read(held, "u2"); code != 404 || !strings.Contains(b, `"not_found"`) {
		t.Errorf("u2 reading u1's held order: %d %s, want 404 not_found", code, b)
	}
	if code, src, b := read(held, "admin"); code != 200 || src != "database" {
		t.Errorf("admin reading u1's held order: %d from %q %s, want 200 from the database", code, src, b)
	}
	if code, src, _ := read(held, "u1"); src != "database" {
		t.Fatalf("u1's order was answered by the cache (%d) after u2's read: u2's read may not have gone to PostgreSQL", code)
	}

	// Gone: u2's read is the one that goes to PostgreSQL (and fills the
	// cache, which is how we know).
	gone := createOrder(t, ts, "u1")
	if err := ts.rdb.Do(t.Context(), ts.rdb.B().Del().Key(ts.prefix+"order:"+gone.String()).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := cache.Get(t.Context(), gone); err != nil || ok {
		t.Fatalf("the order's cache entry is still there after DEL (%v %v): is the key layout still prefix+order:ID?", ok, err)
	}
	if code, _, b := read(gone, "u2"); code != 404 || !strings.Contains(b, `"not_found"`) {
		t.Errorf("u2 reading u1's uncached order: %d %s, want 404 not_found", code, b)
	}
	if _, ok, err := cache.Get(t.Context(), gone); err != nil || !ok {
		t.Fatalf("u2's read did not fill the cache (%v %v): it did not go to PostgreSQL", ok, err)
	}
	if code, src, b := read(gone, "u1"); code != 200 || src != "cache" {
		t.Fatalf("u1 reading its order after u2's read: %d from %q %s", code, src, b)
	}
	// Its events are only ever read from PostgreSQL.
	if code, b, _ := ts.do(t, http.MethodGet, "/orders/"+gone.String()+"/events", "u2", ""); code != 404 {
		t.Errorf("u2 reading u1's order's events: %d %s, want 404", code, b)
	}
}

// sseReader reads one live stream's messages.
type sseReader struct{ r *bufio.Reader }

// next returns the next message's name and data (keep-alive comments
// skipped); an error when the stream ends.
func (s sseReader) next() (string, []byte, error) {
	var name string
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			return "", nil, err
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case strings.HasPrefix(line, "event: "):
			name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			return name, []byte(strings.TrimPrefix(line, "data: ")), nil
		}
	}
}

// openStream opens /live/stream as user and returns its snapshot and
// reader; the stream is registered with the hub once the snapshot is read.
func openStream(t *testing.T, ctx context.Context, ts *testServer, user string) (api.LiveSnapshot, sseReader) {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ts.URL+"/live/stream", nil)
	req.Header.Set("Authorization", "Bearer "+ts.keys[user])
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("opening %s's stream: %v %v", user, resp, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	s := sseReader{bufio.NewReader(resp.Body)}
	name, data, err := s.next()
	var snap api.LiveSnapshot
	if err != nil || name != "snapshot" || json.Unmarshal(data, &snap) != nil {
		t.Fatalf("%s's stream began with %q %s (%v), want its snapshot", user, name, data, err)
	}
	return snap, s
}

// until reads a stream's order events up to and including the one with
// event id last, and returns the order ids they were about.
func (s sseReader) until(t *testing.T, who string, last uuid.UUID) []uuid.UUID {
	t.Helper()
	var ids []uuid.UUID
	for {
		name, data, err := s.next()
		if err != nil {
			t.Fatalf("%s's stream ended before the last event: %v (saw %v)", who, err, ids)
		}
		if name != "order" {
			continue
		}
		var ev api.LiveEvent
		if err := json.Unmarshal(data, &ev); err != nil {
			t.Fatalf("%s's stream: %s: %v", who, data, err)
		}
		ids = append(ids, ev.OrderID)
		if ev.EventID == last {
			return ids
		}
	}
}

// A non-admin key's live stream carries only its user's orders, in the
// snapshot and in every event after it, whichever way the api learns an
// order's owner (OrderCreated's payload, then its memory; PostgreSQL for an
// order whose OrderCreated it never saw); an order of no known owner goes
// to no one. An admin's stream, watching the same events, carries them all.
func TestLiveStreamCarriesOnlyTheKeysOrders(t *testing.T) {
	ts := server(t)
	mine := createOrder(t, ts, "u2")
	theirs := createOrder(t, ts, "u1")    // its OrderCreated is published below
	theirsOld := createOrder(t, ts, "u1") // only later events: its owner comes from PostgreSQL
	nobodys := uuid.Must(uuid.NewV7())    // in no table
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()

	snap, u2 := openStream(t, ctx, ts, "u2")
	var snapIDs []uuid.UUID
	for _, o := range snap.Orders {
		snapIDs = append(snapIDs, o.OrderID)
	}
	if snap.Admin || !slices.Equal(snapIDs, []uuid.UUID{mine}) || len(snap.DeadLetters) > 0 || len(snap.Parked) > 0 {
		t.Fatalf("u2's snapshot: admin %v, orders %v, want only %v", snap.Admin, snapIDs, mine)
	}
	adminSnap, admin := openStream(t, ctx, ts, "admin")
	if len(adminSnap.Orders) != 3 {
		t.Fatalf("the admin's snapshot has %d orders, want 3", len(adminSnap.Orders))
	}

	publish := func(typ event.Type, id uuid.UUID, data any) uuid.UUID {
		t.Helper()
		ev, err := event.New(typ, id, "test", data)
		if err != nil {
			t.Fatal(err)
		}
		ts.api.Publish(ctx, ev)
		return ev.ID
	}
	items := []event.Item{{ProductID: "prod-mouse", Qty: 1}}
	publish(event.OrderCreated, theirs, event.Created{UserID: "u1", Items: items, AmountCents: 100})
	publish(event.InventoryReserved, theirs, event.Reserved{UserID: "u1", Items: items, AmountCents: 100})
	publish(event.InventoryReserved, theirsOld, event.Reserved{UserID: "u1", Items: items, AmountCents: 100})
	publish(event.InventoryReserved, nobodys, event.Reserved{UserID: "u2", Items: items, AmountCents: 100})
	publish(event.InventoryReserved, mine, event.Reserved{UserID: "u2", Items: items, AmountCents: 100})
	// Last, u2's own: each stream gets its messages in order, so once u2's
	// stream has this one it has had everything it was sent.
	last := publish(event.InventoryFailed, mine, event.Failed{Reason: "out_of_stock"})

	if got := u2.until(t, "u2", last); !slices.Equal(got, []uuid.UUID{mine, mine}) {
		t.Errorf("u2's stream carried orders %v, want only its own %v twice", got, mine)
	}
	if got := admin.until(t, "admin", last); !slices.Equal(got, []uuid.UUID{theirs, theirs, theirsOld, mine, mine}) {
		t.Errorf("the admin's stream carried orders %v, want %v", got, []uuid.UUID{theirs, theirs, theirsOld, mine, mine})
	}
}

// Cancelling another user's order is 404, as reading it is, and stamps
// and emits nothing; its owner's cancel is 202 and emits one
// OrderCancelRequested however often it is repeated, by the owner or an
// admin.
func TestCancelAnotherUsersOrderIs404(t *testing.T) {
	ts := server(t)
	id := createOrder(t, ts, "u1")
	cancel := func(user string) (int, string) {
		t.Helper()
		code, b, _ := ts.do(t, http.MethodPost, "/orders/"+id.String()+"/cancel", user, "")
		return code, string(b)
	}
	cancels := func() int64 {
		return schematest.Int(t, ts.pool, `SELECT count(*) FROM outbox WHERE key = $1 AND position('OrderCancelRequested'::bytea IN header_bytes) > 0`, []byte(id.String()))
	}
	if code, b := cancel("u2"); code != http.StatusNotFound || !strings.Contains(b, `"not_found"`) {
		t.Fatalf("u2 cancelling u1's order: %d %s, want 404 not_found", code, b)
	}
	if n := schematest.Int(t, ts.pool, `SELECT count(*) FROM orders WHERE id = $1 AND cancel_requested_at IS NOT NULL`, id); n != 0 || cancels() != 0 {
		t.Fatalf("u2's refused cancel stamped %d orders, emitted %d events", n, cancels())
	}
	for _, user := range []string{"u1", "u1", "admin"} {
		if code, b := cancel(user); code != http.StatusAccepted || !strings.Contains(b, `"cancel_requested_at"`) {
			t.Fatalf("%s cancelling u1's order: %d %s, want 202 with the cancel time", user, code, b)
		}
	}
	if n := cancels(); n != 1 {
		t.Fatalf("%d OrderCancelRequested in the outbox, want 1", n)
	}
}
