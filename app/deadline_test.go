package app_test

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/inventory"
	"github.com/prozess/prozess/modules/payment"
	"github.com/prozess/prozess/schema/schematest"
)

// awaitOrderDeadLetter polls GET /orders/{id} until it shows a dead letter
// from participant, and returns it.
func (r *running) awaitOrderDeadLetter(t *testing.T, id, participant string) deadletter.Entry {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var o api.Order
		r.getJSON(t, "/orders/"+id, &o)
		for _, d := range o.DeadLetters {
			if d.Participant == participant {
				return d
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET /orders/%s shows no dead letter from %s after 30s: %+v", id, participant, o.DeadLetters)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// post sends an empty POST with key and returns the status and body.
func (r *running) post(t *testing.T, path, key string) (int, string) {
	t.Helper()
	code, b := r.postJSON(t, path, key, "")
	return code, string(b)
}

// awaitTrailHas waits until an order's audit trail holds every type in want.
func (r *running) awaitTrailHas(t *testing.T, id string, want ...event.Type) []event.Type {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := r.trail(t, id)
		missing := slices.DeleteFunc(slices.Clone(want), func(w event.Type) bool { return slices.Contains(got, w) })
		if len(missing) == 0 {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit trail of %s is %v, still without %v", id, got, missing)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// awaitCount waits up to a minute until sql counts at least one row.
func (e *env) awaitCount(t *testing.T, sql string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for e.count(sql, args...) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after a minute, still no row: %s %v", sql, args)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkClean runs `prozess check` and fails the test on any violation.
func (e *env) checkClean(t *testing.T, brokers []string, extra ...string) string {
	t.Helper()
	out, err := runCLI(t, append(e.checkArgs(brokers), extra...)...)
	if err != nil {
		t.Fatalf("prozess check: %v\n%s", err, out)
	}
	return out
}

// An order stuck by a dead letter (a bad deploy makes payment reject every
// charge, SQLSTATE 23514) shows the dead letter, with its participant and
// reason, in GET /orders/{id} and `prozess orders get`; at its saga
// deadline it expires: payment answers the OrderExpired with a
// PaymentFailed (no charge), inventory gives the stock back, once, and
// `prozess check` is clean.
func TestSagaDeadlineEndsOrderStuckByDeadLetter(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = 3 * time.Second
	r := e.start(cfg)
	initial := r.stock(t)
	schematest.Exec(t, e.pool, `ALTER TABLE payments ADD CONSTRAINT bad_deploy CHECK (reason IS NOT NULL)`)
	id := r.order(t, "u1", "", mouse(2)).OrderID.String()

	d := r.awaitOrderDeadLetter(t, id, payment.Name)
	if !strings.Contains(d.Reason, "23514") || d.Type != string(event.InventoryReserved) || d.ReplayedAt != nil {
		t.Fatalf("dead letter %+v: want payment's open InventoryReserved with the check violation", d)
	}
	if held := r.stock(t)["prod-mouse"]; held != initial["prod-mouse"]-2 {
		t.Fatalf("stock %d while the order is stuck, want %d held", held, initial["prod-mouse"]-2)
	}
	out, err := runCLI(t, "orders", "get", id, "--database-url", e.dbURL)
	if err != nil || !strings.Contains(out, "dead letters (1)") || !strings.Contains(out, "payment") || !strings.Contains(out, "23514") {
		t.Fatalf("orders get does not show the dead letter: %v\n%s", err, out)
	}

	if got := r.await(t, id, 30*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("stuck order ended %s, want CANCELLED at its deadline", got.Status)
	}
	e.awaitQuiet(30 * time.Second)
	r.awaitTrailHas(t, id, event.InventoryReleased)
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("stock %d after expiry, want %d back", got["prod-mouse"], initial["prod-mouse"])
	}
	for sql, want := range map[string]int64{
		`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'OrderExpired'`:                                        1,
		`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'InventoryReleased'`:                                   1,
		`SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'DECLINED' AND reason = '` + payment.ExpiredReason + `'`: 1,
		`SELECT count(*) FROM reservations WHERE order_id = $1 AND released_at IS NULL`:                                          0,
		`SELECT count(*) FROM orders WHERE id = $1 AND expired_at IS NOT NULL`:                                                   1,
	} {
		if n := e.count(sql, id); n != want {
			t.Errorf("%s: %d, want %d", sql, n, want)
		}
	}
	e.checkClean(t, r.sys.Brokers())
}

// A backlog longer than the saga deadline cancels nothing the system
// itself delayed: inventory is down (not running) for twice the deadline
// while orders come in; none of them expires meanwhile, and once inventory
// is back every order it can serve ships. One order inventory genuinely
// cannot apply (a bad deploy dead-letters its OrderCreated) still expires,
// deadline after inventory received it: only that one gets an OrderExpired.
// (Before this policy the deadline counted from created_at, and every
// order of the outage expired at once, three compensation events each.)
func TestBacklogLongerThanTheDeadlineExpiresOnlyStuckOrders(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = 5 * time.Second
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "payment", "delivery", "status")
	initial := r.stock(t)
	schematest.Exec(t, e.pool, `ALTER TABLE reservations ADD CONSTRAINT bad_deploy CHECK (product_id <> 'prod-keyboard')`)
	var delayed []string
	for range 10 {
		delayed = append(delayed, r.order(t, "u1", "", mouse(1)).OrderID.String())
	}
	stuck := r.order(t, "u1", "", event.Item{ProductID: "prod-keyboard", Qty: 1}).OrderID.String()

	time.Sleep(2 * cfg.SagaDeadline) // inventory down for twice the deadline
	if n := e.count(`SELECT count(*) FROM orders WHERE expired_at IS NOT NULL`); n != 0 {
		t.Fatalf("%d orders expired while inventory was down: the deadline punished the backlog", n)
	}
	e.start(cfg, "inventory")
	for _, id := range delayed {
		if got := r.await(t, id, 60*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("delayed order %s ended %s, want SHIPPED", id, got.Status)
		}
	}
	e.awaitCount(t, `SELECT count(*) FROM dead_letters WHERE order_id = $1 AND participant = 'inventory'`, stuck)
	if got := r.await(t, stuck, 60*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("stuck order ended %s, want CANCELLED at its deadline", got.Status)
	}
	e.awaitQuiet(30 * time.Second)
	if n := e.count(`SELECT count(*) FROM order_events WHERE type = 'OrderExpired'`); n != 1 {
		t.Fatalf("%d OrderExpired events, want 1 (the stuck order's)", n)
	}
	got := r.stock(t)
	if got["prod-mouse"] != initial["prod-mouse"]-int64(len(delayed)) || got["prod-keyboard"] != initial["prod-keyboard"] {
		t.Fatalf("stock mouse %d keyboard %d, want %d and %d", got["prod-mouse"], got["prod-keyboard"],
			initial["prod-mouse"]-int64(len(delayed)), initial["prod-keyboard"])
	}
	e.checkClean(t, cfg.KafkaBrokers)
}

// An OrderExpired that payment dead-letters does not leave its order stuck:
// a bad deploy makes payment refuse every decision (CHECK amount_cents < 0),
// so it dead-letters the order's InventoryReserved and then, at the
// deadline, its OrderExpired. The deploy is fixed; the sweeper sends the
// expiry again (same event id, a replay header), payment declines without
// a charge, inventory gives the stock back, and the order ends CANCELLED
// with one OrderExpired in its trail.
func TestDeadLetteredExpiryIsSentAgainUntilTheOrderEnds(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = 3 * time.Second
	r := e.start(cfg)
	initial := r.stock(t)
	schematest.Exec(t, e.pool, `ALTER TABLE payments ADD CONSTRAINT bad_deploy CHECK (amount_cents < 0)`)
	id := r.order(t, "u1", "", mouse(2)).OrderID.String()
	r.awaitOrderDeadLetter(t, id, payment.Name)
	e.awaitCount(t, `SELECT count(*) FROM dead_letters WHERE order_id = $1 AND participant = 'payment' AND event_type = 'OrderExpired'`, id)
	schematest.Exec(t, e.pool, `ALTER TABLE payments DROP CONSTRAINT bad_deploy`)

	if got := r.await(t, id, 60*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED", got.Status)
	}
	r.awaitTrailHas(t, id, event.InventoryReleased)
	e.awaitQuiet(30 * time.Second)
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("stock %d, want %d back", got["prod-mouse"], initial["prod-mouse"])
	}
	for sql, want := range map[string]int64{
		`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'OrderExpired'`:                                        1,
		`SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'DECLINED' AND reason = '` + payment.ExpiredReason + `'`: 1,
		`SELECT count(*) FROM orders WHERE id = $1 AND expiry_sends >= 2`:                                                        1,
	} {
		if n := e.count(sql, id); n != want {
			t.Errorf("%s: %d, want %d", sql, n, want)
		}
	}
	e.checkClean(t, r.sys.Brokers())
}

// The expiry crossing a replayed OrderCreated, and the re-drive endpoint:
// inventory dead-letters an order's OrderCreated (a bad deploy), so nothing
// is reserved; the order expires and is cancelled; inventory remembers the
// release it could not match. The cause is fixed and an admin re-drives
// the dead letter: inventory refuses the reservation (InventoryFailed), the
// stock stays, the trail records the re-drive, check is clean. Only an
// admin key may re-drive (404 for others), and only once (409).
func TestSagaDeadlineCrossingReplayedOrderCreatedReservesNothing(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = 3 * time.Second
	r := e.start(cfg)
	initial := r.stock(t)
	schematest.Exec(t, e.pool, `ALTER TABLE reservations ADD CONSTRAINT bad_deploy CHECK (qty < 0)`)
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	d := r.awaitOrderDeadLetter(t, id, inventory.Name)
	if got := r.await(t, id, 30*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED at its deadline", got.Status)
	}
	r.awaitTrailHas(t, id, event.PaymentFailed)
	e.awaitQuiet(30 * time.Second)
	schematest.Exec(t, e.pool, `ALTER TABLE reservations DROP CONSTRAINT bad_deploy`)

	path := "/admin/dead-letters/" + strconv.FormatInt(d.ID, 10) + "/replay"
	if code, body := r.post(t, path, e.keyFor("u1")); code != http.StatusNotFound || !strings.Contains(body, `"not_found"`) {
		t.Fatalf("a user key re-driving: %d %s, want 404", code, body)
	}
	if code, body := r.post(t, "/admin/dead-letters/x/replay", e.keyFor("admin")); code != http.StatusBadRequest {
		t.Fatalf("a bad id: %d %s, want 400", code, body)
	}
	if code, body := r.post(t, path, e.keyFor("admin")); code != http.StatusOK {
		t.Fatalf("re-drive: %d %s", code, body)
	}
	if code, body := r.post(t, path, e.keyFor("admin")); code != http.StatusConflict || !strings.Contains(body, "already_replayed") {
		t.Fatalf("second re-drive: %d %s, want 409", code, body)
	}
	trail := r.awaitTrailHas(t, id, event.InventoryFailed, deadletter.TrailType)
	e.awaitQuiet(30 * time.Second)
	if slices.Contains(trail, event.InventoryReserved) {
		t.Fatalf("the replayed OrderCreated reserved stock for a cancelled order: %v", trail)
	}
	if n := e.count(`SELECT count(*) FROM reservations WHERE order_id = $1`, id); n != 0 {
		t.Fatalf("%d reservation lines for an expired order", n)
	}
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("stock %d, want %d", got["prod-mouse"], initial["prod-mouse"])
	}
	var o api.Order
	r.getJSON(t, "/orders/"+id, &o)
	if len(o.DeadLetters) != 1 || o.DeadLetters[0].ReplayedAt == nil || !strings.Contains(o.DeadLetters[0].ReplayedBy, "admin") {
		t.Fatalf("dead letters after the re-drive: %+v", o.DeadLetters)
	}
	e.checkClean(t, r.sys.Brokers())
}

// A paid order is never expired: delivery dead-letters its shipment (a bad
// deploy), so it stays PAID past its deadline; no OrderExpired is emitted,
// and it is reported instead: by the metric, `prozess check` and the live
// page's snapshot.
func TestPaidOrderIsNeverExpiredOnlyReported(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = time.Second
	r := e.start(cfg)
	schematest.Exec(t, e.pool, `ALTER TABLE shipments ADD CONSTRAINT bad_deploy CHECK (carrier <> 'prozess-post')`)
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	r.awaitOrderDeadLetter(t, id, "delivery")
	if o := r.awaitStatus(t, id, event.StatusPaid, 30*time.Second); o.Status != event.StatusPaid {
		t.Fatalf("order is %s, want PAID", o.Status)
	}
	// Ten sweeps past the deadline (they run every 100 ms at this deadline).
	time.Sleep(3 * time.Second)
	var o api.Order
	r.getJSON(t, "/orders/"+id, &o)
	if o.Status != event.StatusPaid || e.count(`SELECT count(*) FROM order_events WHERE type = 'OrderExpired'`) != 0 {
		t.Fatalf("a paid order was expired: %s, trail %v", o.Status, r.trail(t, id))
	}
	if v := value(scrape(t, "http://"+r.sys.AdminAddr()+"/metrics"), "prozess_saga_paid_overdue_orders "); v != 1 {
		t.Errorf("prozess_saga_paid_overdue_orders is %v, want 1", v)
	}
	out, err := runCLI(t, append(e.checkArgs(r.sys.Brokers()), "--saga-deadline", "1s", "--deadline", "1s")...)
	if err == nil || !strings.Contains(out, "1 paid orders past the saga deadline") || !strings.Contains(out, "never cancelled") {
		t.Fatalf("check does not report the paid order past its deadline: %v\n%s", err, out)
	}
}

// olderPayment is payment as a release before OrderExpired runs it: it
// handles InventoryReserved only, so its consumer skips an OrderExpired
// without claiming it.
type olderPayment struct{ *payment.Payment }

func (olderPayment) Handles(t event.Type) bool { return t == event.InventoryReserved }

// The rolling-upgrade hazard of the expiry: status upgraded before payment.
// An order is stuck (the older payment dead-letters its InventoryReserved),
// expires, and the older payment skips the OrderExpired, and its copies,
// silently. Once payment is upgraded, the next copy is answered: the order
// ends CANCELLED with its stock back, one OrderExpired in its trail.
func TestExpirySkippedByAnOlderPaymentEndsOnceItIsUpgraded(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = 3 * time.Second
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "inventory", "delivery", "status")
	initial := r.stock(t)
	p, err := payment.New(slog.New(slog.DiscardHandler), 0, rand.New(rand.NewPCG(1, 2)))
	if err != nil {
		t.Fatal(err)
	}
	c, err := saga.NewConsumer(payment.Name, slog.New(slog.DiscardHandler), e.pool, olderPayment{p}, saga.ConsumerConfig{
		Kafka: saga.Conn{Brokers: cfg.KafkaBrokers}, Group: cfg.GroupPrefix + payment.Name, Topic: cfg.Topic, DLQTopic: cfg.DLQTopic()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() { stop(); <-done; c.Close() }) // Close twice is harmless

	schematest.Exec(t, e.pool, `ALTER TABLE payments ADD CONSTRAINT bad_deploy CHECK (amount_cents < 0)`)
	id := r.order(t, "u1", "", mouse(2)).OrderID.String()
	e.awaitCount(t, `SELECT count(*) FROM dead_letters WHERE order_id = $1 AND participant = 'payment'`, id)
	schematest.Exec(t, e.pool, `ALTER TABLE payments DROP CONSTRAINT bad_deploy`)
	r.awaitTrailHas(t, id, event.OrderExpired)
	time.Sleep(2 * cfg.SagaDeadline) // a copy goes out after one deadline; the older payment skips it too
	if n := e.count(`SELECT count(*) FROM payments WHERE order_id = $1`, id); n != 0 || slices.Contains(r.trail(t, id), event.PaymentFailed) {
		t.Fatalf("the older payment answered an OrderExpired")
	}

	stop() // payment is upgraded: the older one leaves its group
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	done <- nil
	c.Close()
	e.start(cfg, "payment")
	if got := r.await(t, id, 90*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED", got.Status)
	}
	r.awaitTrailHas(t, id, event.InventoryReleased)
	e.awaitQuiet(30 * time.Second)
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("stock %d, want %d back", got["prod-mouse"], initial["prod-mouse"])
	}
	if n := e.count(`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'OrderExpired'`, id); n != 1 {
		t.Fatalf("%d OrderExpired in the trail, want 1", n)
	}
	e.checkClean(t, cfg.KafkaBrokers)
}
