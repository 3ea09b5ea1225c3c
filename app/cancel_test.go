package app_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/delivery"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/payment"
	"github.com/prozess/prozess/schema/schematest"
)

// cancel posts POST /orders/{id}/cancel as user and returns the status and
// the body.
func (r *running) cancel(t *testing.T, id, user string) (int, string) {
	t.Helper()
	return r.post(t, "/orders/"+id+"/cancel", r.e.keyFor(user))
}

// cancelAccepted cancels as user and fails the test unless the answer is
// 202 with the order, its cancel stamped.
func (r *running) cancelAccepted(t *testing.T, id, user string) api.CancelResponse {
	t.Helper()
	code, body := r.cancel(t, id, user)
	var res api.CancelResponse
	if code != http.StatusAccepted || json.Unmarshal([]byte(body), &res) != nil || res.OrderID.String() != id {
		t.Fatalf("%s cancelling %s: %d %s, want 202 with the order", user, id, code, body)
	}
	return res
}

// counts fails the test unless each query counts its rows for id.
func (e *env) counts(t *testing.T, id string, want map[string]int64) {
	t.Helper()
	for sql, n := range want {
		if got := e.count(sql, id); got != n {
			t.Errorf("%s: %d, want %d", sql, got, n)
		}
	}
}

// A cancel before payment: inventory is down, so the order is CREATED when
// its owner cancels it. Payment reads the OrderCancelRequested before any
// InventoryReserved and stores a declined decision without a charge; once
// inventory is back it reserves, finds the decline and gives the stock
// back. A second cancel is answered the same and emits nothing; another
// user's cancel is 404, as reading the order is; a bad id 400.
func TestCancelBeforePaymentChargesNothing(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "payment", "delivery", "status")
	initial := r.stock(t)
	id := r.order(t, "u1", "", mouse(2)).OrderID.String()

	if code, body := r.cancel(t, id, "u2"); code != http.StatusNotFound || !strings.Contains(body, `"not_found"`) {
		t.Fatalf("u2 cancelling u1's order: %d %s, want 404 not_found", code, body)
	}
	if code, body := r.cancel(t, "not-a-uuid", "u1"); code != http.StatusBadRequest || !strings.Contains(body, `"invalid_order_id"`) {
		t.Fatalf("cancelling a bad id: %d %s, want 400", code, body)
	}
	if n := e.count(`SELECT count(*) FROM orders WHERE cancel_requested_at IS NOT NULL`); n != 0 {
		t.Fatalf("a refused cancel stamped %d orders", n)
	}
	first := r.cancelAccepted(t, id, "u1")
	if first.CancelRequestedAt == nil || first.Status != event.StatusCreated {
		t.Fatalf("first cancel answered %+v, want the CREATED order with its cancel time", first)
	}
	again := r.cancelAccepted(t, id, "u1")
	if again.CancelRequestedAt == nil || !again.CancelRequestedAt.Equal(*first.CancelRequestedAt) {
		t.Fatalf("second cancel answered %v, want the first cancel's time %v", again.CancelRequestedAt, first.CancelRequestedAt)
	}
	r.awaitTrailHas(t, id, event.OrderCancelRequested, event.PaymentFailed)

	e.start(cfg, "inventory")
	if got := r.await(t, id, 30*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED", got.Status)
	}
	e.awaitQuiet(30 * time.Second)
	// Inventory reserves and releases, or (the decline in the batch of the
	// OrderCreated) refuses to reserve: either way nothing is held.
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		trail := r.trail(t, id)
		if slices.Contains(trail, event.InventoryFailed) || slices.Contains(trail, event.InventoryReleased) {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("inventory never answered: trail %v", trail)
		}
	}
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("stock %d, want %d back", got["prod-mouse"], initial["prod-mouse"])
	}
	e.counts(t, id, map[string]int64{
		`SELECT count(*) FROM reservations WHERE order_id = $1 AND released_at IS NULL`:                                            0,
		`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'OrderCancelRequested'`:                                  1,
		`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'PaymentFailed'`:                                         1,
		`SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'DECLINED' AND reason = '` + payment.CancelledReason + `'`: 1,
		`SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'COMPLETED'`:                                               0,
		`SELECT count(*) FROM refunds WHERE order_id = $1`:                                                                         0,
		`SELECT count(*) FROM shipments WHERE order_id = $1`:                                                                       0,
	})
	// Cancelling the CANCELLED order again changes nothing.
	if res := r.cancelAccepted(t, id, "admin"); res.Status != event.StatusCancelled {
		t.Fatalf("cancelling the cancelled order: %+v", res)
	}
	e.checkClean(t, cfg.KafkaBrokers)
}

// A cancel after payment, before shipping: delivery is down, so the order
// is PAID when its owner cancels it. Delivery comes back, reads the cancel
// on the order before it ships, and withholds it (ShipmentCancelled);
// payment refunds the charge, once, in its own row; inventory gives the
// stock back; the order ends CANCELLED with the refund in its trail.
func TestCancelAfterPaymentRefundsAndNeverShips(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "inventory", "payment", "status")
	initial := r.stock(t)
	id := r.order(t, "u1", "", mouse(3)).OrderID.String()
	if o := r.awaitStatus(t, id, event.StatusPaid, 30*time.Second); o.Status != event.StatusPaid {
		t.Fatalf("order is %s, want PAID", o.Status)
	}
	if res := r.cancelAccepted(t, id, "u1"); res.Status != event.StatusPaid {
		t.Fatalf("cancel answered %+v, want the PAID order", res)
	}
	r.cancelAccepted(t, id, "u1")

	e.start(cfg, "delivery")
	if got := r.await(t, id, 30*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED", got.Status)
	}
	e.awaitQuiet(30 * time.Second)
	trail := r.awaitTrailHas(t, id, event.InventoryReleased)
	want := []event.Type{event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.OrderCancelRequested,
		event.ShipmentCancelled, event.PaymentRefunded, event.InventoryReleased}
	if !slices.Equal(trail, want) {
		t.Fatalf("trail %v, want %v", trail, want)
	}
	var evs []api.AuditEvent
	r.getJSON(t, "/orders/"+id+"/events", &evs)
	var refund event.Refunded
	if err := json.Unmarshal(evs[5].Data, &refund); err != nil || refund.AmountCents != 3*2999 {
		t.Fatalf("PaymentRefunded %s: want the 8997 cents charged (%v)", evs[5].Data, err)
	}
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("stock %d, want %d back", got["prod-mouse"], initial["prod-mouse"])
	}
	e.counts(t, id, map[string]int64{
		`SELECT count(*) FROM refunds f JOIN payments p USING (order_id) WHERE f.order_id = $1 AND p.status = 'COMPLETED' AND f.payment_id = p.id AND f.amount_cents = 8997`: 1,
		`SELECT count(*) FROM withheld_shipments WHERE order_id = $1`:                   1,
		`SELECT count(*) FROM shipments WHERE order_id = $1`:                            0,
		`SELECT count(*) FROM reservations WHERE order_id = $1 AND released_at IS NULL`: 0,
	})
	e.checkClean(t, cfg.KafkaBrokers)
}

// After shipping a cancel is refused, 409 with a JSON error, and changes
// nothing; the order stays SHIPPED with no refund.
func TestCancelAfterShippingIsRefused(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	if got := r.await(t, id, 30*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order ended %s, want SHIPPED", got.Status)
	}
	for range 2 {
		code, body := r.cancel(t, id, "u1")
		var e struct {
			Error api.Error `json:"error"`
		}
		if code != http.StatusConflict || json.Unmarshal([]byte(body), &e) != nil || e.Error.Code != "already_shipped" {
			t.Fatalf("cancelling a shipped order: %d %s, want 409 already_shipped", code, body)
		}
	}
	time.Sleep(300 * time.Millisecond) // room for a wrongly emitted cancel to show
	e.counts(t, id, map[string]int64{
		`SELECT count(*) FROM orders WHERE id = $1 AND status = 'SHIPPED' AND cancel_requested_at IS NULL`: 1,
		`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'OrderCancelRequested'`:          0,
		`SELECT count(*) FROM refunds WHERE order_id = $1`:                                                 0,
	})
	e.checkClean(t, r.sys.Brokers())
}

// cancelOutcome is how one raced order ended.
type cancelOutcome string

// outcomeOf classifies an order that ended, and fails the test for any end
// the rules forbid: a 202 (the cancel recorded) must end CANCELLED, never
// shipped, refunded exactly when it was charged; a 409 must end SHIPPED
// with no refund.
func (e *env) outcomeOf(t *testing.T, id string, code int) cancelOutcome {
	t.Helper()
	var status, pay string
	var shipped, refunded, withheld bool
	if err := e.pool.QueryRow(t.Context(), `
		SELECT o.status, coalesce(p.status, 'none'),
		       EXISTS (SELECT 1 FROM shipments s WHERE s.order_id = o.id),
		       EXISTS (SELECT 1 FROM refunds f WHERE f.order_id = o.id),
		       EXISTS (SELECT 1 FROM withheld_shipments w WHERE w.order_id = o.id)
		FROM orders o LEFT JOIN payments p ON p.order_id = o.id WHERE o.id = $1`, id).
		Scan(&status, &pay, &shipped, &refunded, &withheld); err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprintf("%d: status %s, payment %s, shipped %v, refunded %v, withheld %v", code, status, pay, shipped, refunded, withheld)
	switch {
	case code == http.StatusConflict && status == "SHIPPED" && pay == "COMPLETED" && shipped && !refunded && !withheld:
		return "shipped first (409)"
	case code == http.StatusAccepted && status == "CANCELLED" && pay == "DECLINED" && !shipped && !refunded:
		return "cancelled before the charge"
	case code == http.StatusAccepted && status == "CANCELLED" && pay == "COMPLETED" && !shipped && refunded && withheld:
		return "charged, then refunded"
	}
	t.Errorf("order %s ended %s", id, got)
	return cancelOutcome(got)
}

// Cancels racing the charge and the shipment: every participant runs, and
// each order is cancelled by its owner between 0 and five times the time
// one order takes to ship on this machine (measured first, so a slow
// machine spreads its cancels as far), so the cancel lands before, between
// and after the charge and the shipment. Whichever decides first wins:
// each order ends as outcomeOf allows (never shipped after a 202, never
// charged without a shipment or a refund), stock is conserved, check is
// clean, and over the run every one of the three ends is seen.
func TestCancelRacingChargeAndShipment(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	initial := r.stock(t)
	start := time.Now()
	r.await(t, r.order(t, "u0", "", mouse(1)).OrderID.String(), 30*time.Second)
	saga := time.Since(start)
	const n = 120
	// After the order, as fractions of one saga, plus up to a fifth more.
	spread := []float64{0, 0.2, 0.5, 1, 2, 5}
	codes := make(map[string]int, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			user := fmt.Sprintf("u%d", i%7)
			id := r.order(t, user, "", mouse(1+i%3)).OrderID.String()
			time.Sleep(time.Duration((spread[i%len(spread)] + rand.Float64()/5) * float64(saga)))
			code, body := r.cancel(t, id, user)
			if code != http.StatusAccepted && code != http.StatusConflict {
				t.Errorf("cancel of %s: %d %s", id, code, body)
			}
			mu.Lock()
			codes[id] = code
			mu.Unlock()
		}()
	}
	wg.Wait()
	e.awaitQuiet(60 * time.Second)
	seen := map[cancelOutcome]int{}
	for id, code := range codes {
		seen[e.outcomeOf(t, id, code)]++
	}
	t.Logf("one saga took %s; outcomes of %d raced cancels: %v", saga, n, seen)
	for _, want := range []cancelOutcome{"shipped first (409)", "cancelled before the charge", "charged, then refunded"} {
		if seen[want] == 0 {
			t.Errorf("no order %s: the race did not cover that ordering (%v)", want, seen)
		}
	}
	e.assertExactlyOnce(initial, r.stock(t))
	e.checkClean(t, r.sys.Brokers())
}

// Cancels racing the saga deadline: inventory dead-letters every order's
// OrderCreated (a bad deploy), so each order expires a deadline after its
// dead letter; a second group of orders comes half a deadline after the
// first, and as the first expiry is decided their owner cancels all of
// them, the first group's a moment after their expiry, the second's
// before theirs. Payment decides each once, by whichever of OrderExpired
// and OrderCancelRequested it reads first: one declined decision (with
// that one's reason), one PaymentFailed, no charge, nothing reserved, and
// check is clean.
func TestCancelRacingTheDeadline(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = 2 * time.Second
	r := e.start(cfg)
	initial := r.stock(t)
	schematest.Exec(t, e.pool, `ALTER TABLE reservations ADD CONSTRAINT bad_deploy CHECK (qty < 0)`)
	var ids []string
	group := func() {
		for range 6 {
			ids = append(ids, r.order(t, "u1", "", mouse(1)).OrderID.String())
		}
		for e.count(`SELECT count(DISTINCT order_id) FROM dead_letters`) < int64(len(ids)) {
			time.Sleep(20 * time.Millisecond)
		}
	}
	group()
	time.Sleep(cfg.SagaDeadline / 2) // the second group's clocks start half a deadline later
	group()
	e.awaitCount(t, `SELECT count(*) FROM orders WHERE expired_at IS NOT NULL`)
	for i := range 6 { // interleaved: first group, second group
		r.cancelAccepted(t, ids[i], "u1")
		r.cancelAccepted(t, ids[6+i], "u1")
	}
	reasons := map[string]int{}
	for _, id := range ids {
		if got := r.await(t, id, 60*time.Second); got.Status != event.StatusCancelled {
			t.Fatalf("order %s ended %s, want CANCELLED", id, got.Status)
		}
		var reason string
		if err := e.pool.QueryRow(t.Context(), `SELECT reason FROM payments WHERE order_id = $1 AND status = 'DECLINED'`, id).Scan(&reason); err != nil {
			t.Fatalf("order %s has no declined decision: %v", id, err)
		}
		reasons[reason]++
		// An order its expiry had cancelled already is answered as it
		// stands: at most one OrderCancelRequested.
		if n := e.count(`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'OrderCancelRequested'`, id); n > 1 {
			t.Errorf("order %s: %d OrderCancelRequested", id, n)
		}
		e.counts(t, id, map[string]int64{
			`SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'PaymentFailed'`: 1,
			`SELECT count(*) FROM reservations WHERE order_id = $1`:                            0,
			`SELECT count(*) FROM refunds WHERE order_id = $1`:                                 0,
		})
	}
	t.Logf("decided by: %v", reasons)
	if reasons[payment.ExpiredReason] == 0 || reasons[payment.CancelledReason] == 0 {
		t.Errorf("want orders decided by each of the deadline and the cancel: %v", reasons)
	}
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("stock %d, want %d", got["prod-mouse"], initial["prod-mouse"])
	}
	schematest.Exec(t, e.pool, `ALTER TABLE reservations DROP CONSTRAINT bad_deploy`)
	e.awaitQuiet(30 * time.Second)
	e.checkClean(t, r.sys.Brokers())
}

// Every event of a run with cancels at every point is delivered twice (the
// cancels, withholds and refunds among them): the inbox skips each copy,
// so there is one refund per refunded order, one release, and nothing
// dead-lettered.
func TestCancelsDeliveredTwiceChangeNothing(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "inventory", "payment", "status")
	dups := duplicate(t, cfg.KafkaBrokers, cfg.Topic)
	initial := r.stock(t)
	var paid []string
	for i := range 10 {
		id := r.order(t, fmt.Sprintf("u%d", i), "", mouse(1+i%2)).OrderID.String()
		r.awaitStatus(t, id, event.StatusPaid, 30*time.Second)
		paid = append(paid, id)
	}
	for _, id := range paid[:6] {
		r.cancelAccepted(t, id, "admin") // refunded once delivery runs
	}
	d := e.start(cfg, "delivery")
	for _, id := range paid[6:] {
		r.await(t, id, 30*time.Second) // shipped
	}
	// Orders cancelled at once, with every participant running: most
	// before their charge, a few after it, or refused after their
	// shipment (outcomeOf holds each to its answer).
	late := map[string]int{}
	for range 4 {
		id := r.order(t, "late", "", mouse(1)).OrderID.String()
		code, body := r.cancel(t, id, "late")
		if code != http.StatusAccepted && code != http.StatusConflict {
			t.Fatalf("cancelling %s: %d %s", id, code, body)
		}
		late[id] = code
	}
	e.awaitQuiet(60 * time.Second)
	e.awaitCopied(dups, 60*time.Second)
	for _, typ := range []event.Type{event.OrderCancelRequested, event.ShipmentCancelled, event.PaymentRefunded} {
		if dups.ofType(typ) == 0 {
			t.Fatalf("no %s was delivered twice", typ)
		}
	}
	// Each participant, in whichever system runs it, has skipped every
	// copy of its types.
	deadline := time.Now().Add(60 * time.Second)
	for {
		var short []string
		for name, h := range handlers() {
			st, ok := r.sys.Stats()[name]
			if !ok {
				st = d.sys.Stats()[name]
			}
			if got, want := st.Duplicates.Load(), dups.of(h); got < want {
				short = append(short, fmt.Sprintf("%s skipped %d of %d", name, got, want))
			}
		}
		if len(short) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("copies not skipped: %v", short)
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.awaitQuiet(30 * time.Second)
	for _, id := range paid[:6] {
		if e.outcomeOf(t, id, http.StatusAccepted) != "charged, then refunded" {
			t.Errorf("paid order %s cancelled before delivery ran was not refunded", id)
		}
	}
	for _, id := range paid[6:] {
		e.outcomeOf(t, id, http.StatusConflict)
	}
	for id, code := range late {
		e.outcomeOf(t, id, code)
	}
	if n := e.count(`SELECT count(*) FROM refunds`); n < 6 || n != e.count(`SELECT count(*) FROM order_events WHERE type = 'PaymentRefunded'`) {
		t.Errorf("%d refunds, want one per PaymentRefunded in the trail (at least 6)", n)
	}
	e.assertInboxOnce()
	e.assertExactlyOnce(initial, r.stock(t))
	e.assertNoDeadLetters(cfg.KafkaBrokers, cfg.DLQTopic())
}

// ofType is the copies published of one event type.
func (c *copies) ofType(typ event.Type) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byType[typ]
}

// `prozess orders cancel` is an operator's cancel: the same transaction as
// an admin's POST, so a paid order is refunded once delivery runs; a
// repeat changes nothing; mistakes and a shipped order are errors naming
// what was wrong.
func TestOrdersCancelCommand(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "inventory", "payment", "status")
	db := []string{"--database-url", e.dbURL, "--topic", cfg.Topic, "--log-level", "warn"}
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	r.awaitStatus(t, id, event.StatusPaid, 30*time.Second)

	out, err := runCLI(t, append([]string{"orders", "cancel", id}, db...)...)
	if err != nil || !strings.Contains(out, "cancel requested (it was PAID)") {
		t.Fatalf("orders cancel: %v\n%s", err, out)
	}
	out, err = runCLI(t, append([]string{"orders", "cancel", id}, db...)...)
	if err != nil || !strings.Contains(out, "nothing to do") {
		t.Fatalf("orders cancel again: %v\n%s", err, out)
	}
	e.start(cfg, "delivery")
	if got := r.await(t, id, 30*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED", got.Status)
	}
	e.awaitQuiet(30 * time.Second)
	e.counts(t, id, map[string]int64{
		`SELECT count(*) FROM refunds WHERE order_id = $1`:                                                       1,
		`SELECT count(*) FROM orders WHERE id = $1 AND cancel_requested_by = 'operator (prozess orders cancel)'`: 1,
	})
	shipped := r.order(t, "u1", "", mouse(1)).OrderID.String()
	r.await(t, shipped, 30*time.Second)
	for _, c := range []struct{ id, want string }{
		{"nope", "ORDER_ID"},
		{"01a2154b-12fe-7269-98f9-3dd93c718619", "no such order"},
		{shipped, "has shipped"},
	} {
		if out, err := runCLI(t, append([]string{"orders", "cancel", c.id}, db...)...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("orders cancel %s: %v, want an error saying %q\n%s", c.id, err, c.want, out)
		}
	}
	e.checkClean(t, cfg.KafkaBrokers)
}

// The row lock that makes a cancel and a shipment exclude each other, in
// both orders, with the transactions held open so each one really waits:
// a cancel while delivery's shipment is uncommitted waits for it and is
// refused (409); delivery deciding while a cancel's stamp is uncommitted
// waits for it and withholds. Without either lock the second would read
// around the first and an order would be shipped and refunded.
func TestCancelAndShipmentExcludeEachOther(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	d := delivery.New(slog.New(slog.DiscardHandler))
	paid := func(id uuid.UUID) []event.Event {
		ev, err := event.New(event.PaymentCompleted, id, "payment", event.Paid{PaymentID: uuid.New(), AmountCents: 2999})
		if err != nil {
			t.Fatal(err)
		}
		return []event.Event{ev}
	}
	waits := func(what string, done chan struct{}, commit func()) {
		t.Helper()
		select {
		case <-done:
			t.Fatalf("%s did not wait for the other transaction", what)
		case <-time.After(500 * time.Millisecond):
		}
		commit()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s still waiting after the other transaction committed", what)
		}
	}

	// Delivery first: its shipment is uncommitted when the cancel comes.
	shipped := e.insertOrder()
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if out, err := d.Handle(ctx, tx, paid(shipped)); err != nil || len(out) != 1 || out[0].Type != event.OrderShipped {
		t.Fatalf("delivery: %v %+v, want OrderShipped", err, out)
	}
	var cancelErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _, cancelErr = api.CancelOrder(ctx, e.pool, "order-events", shipped, "u1", func(string) bool { return true })
	}()
	waits("the cancel", done, func() {
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	})
	if !errors.Is(cancelErr, api.ErrShipped) {
		t.Fatalf("the cancel after the shipment: %v, want ErrShipped", cancelErr)
	}

	// The cancel first: its stamp is uncommitted when delivery decides.
	withheld := e.insertOrder()
	tx2, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx2.Rollback(ctx)
	// What CancelOrder does, held open: the row FOR UPDATE, then the stamp.
	if _, err := tx2.Exec(ctx, `SELECT 1 FROM orders WHERE id = $1 FOR UPDATE`, withheld); err != nil {
		t.Fatal(err)
	}
	if _, err := tx2.Exec(ctx, `UPDATE orders SET cancel_requested_at = now(), cancel_requested_by = 'u1' WHERE id = $1`, withheld); err != nil {
		t.Fatal(err)
	}
	var out []event.Event
	var handleErr error
	done = make(chan struct{})
	go func() {
		defer close(done)
		handleErr = pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
			var err error
			out, err = d.Handle(ctx, tx, paid(withheld))
			return err
		})
	}()
	waits("delivery", done, func() {
		if err := tx2.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	})
	if handleErr != nil || len(out) != 1 || out[0].Type != event.ShipmentCancelled {
		t.Fatalf("delivery after the cancel: %v %+v, want ShipmentCancelled", handleErr, out)
	}
	e.counts(t, withheld.String(), map[string]int64{
		`SELECT count(*) FROM shipments WHERE order_id = $1`:          0,
		`SELECT count(*) FROM withheld_shipments WHERE order_id = $1`: 1,
	})
}
