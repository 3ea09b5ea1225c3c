package payment_test

import (
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/payment"
	"github.com/prozess/prozess/schema/schematest"
)

func newPayment(t *testing.T, rate float64) *payment.Payment {
	t.Helper()
	p, err := payment.New(slog.New(slog.NewTextHandler(io.Discard, nil)), rate, rand.New(rand.NewPCG(1, 2)))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func reserved(t *testing.T, order uuid.UUID) event.Event {
	t.Helper()
	ev, err := event.New(event.InventoryReserved, order, "inventory",
		event.Reserved{UserID: "u1", Items: []event.Item{{ProductID: "a", Qty: 1}}, AmountCents: 4200})
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func TestDecision(t *testing.T) {
	for _, tc := range []struct {
		rate   float64
		want   event.Type
		status string
	}{
		{0, event.PaymentCompleted, "COMPLETED"},
		{1, event.PaymentFailed, "DECLINED"},
	} {
		t.Run(string(tc.want), func(t *testing.T) {
			t.Parallel()
			pool := schematest.NewPool(t)
			p := newPayment(t, tc.rate)
			order := uuid.New()
			out := schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
				return p.Handle(context.Background(), tx, []event.Event{reserved(t, order)})
			})
			if len(out) != 1 || out[0].Type != tc.want {
				t.Fatalf("emitted %+v, want one %s", out, tc.want)
			}
			if n := schematest.Int(t, pool, `SELECT count(*) FROM payments WHERE order_id = $1 AND status = $2 AND amount_cents = 4200`, order, tc.status); n != 1 {
				t.Fatalf("%d %s payments stored, want 1", n, tc.status)
			}
		})
	}
}

// A second InventoryReserved for the same order, even under a new event id,
// never charges again: the stored decision stands.
func TestNeverChargesTwice(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	p := newPayment(t, 0.5)
	order := uuid.New()
	var emitted int
	for range 10 {
		out := schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
			return p.Handle(context.Background(), tx, []event.Event{reserved(t, order)})
		})
		emitted += len(out)
	}
	if emitted != 1 {
		t.Fatalf("%d decisions emitted for one order, want 1", emitted)
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM payments`); n != 1 {
		t.Fatalf("%d payments stored, want 1", n)
	}
}

func TestDeclineRateIsValidated(t *testing.T) {
	for _, rate := range []float64{-0.1, 1.5} {
		if _, err := payment.New(slog.Default(), rate, rand.New(rand.NewPCG(1, 2))); err == nil {
			t.Errorf("decline rate %v accepted", rate)
		}
	}
}

func TestDeclineRateIsHonoured(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	p := newPayment(t, 0.15)
	const n = 400
	declined := 0
	schematest.InTx(t, pool, func(tx pgx.Tx) (struct{}, error) {
		for range n {
			out, err := p.Handle(context.Background(), tx, []event.Event{reserved(t, uuid.New())})
			if err != nil {
				return struct{}{}, err
			}
			if out[0].Type == event.PaymentFailed {
				declined++
			}
		}
		return struct{}{}, nil
	})
	// 15% of 400 is 60; the seeded generator must land well inside 30..90.
	if declined < 30 || declined > 90 {
		t.Fatalf("%d of %d declined at rate 0.15", declined, n)
	}
}

// Two InventoryReserved for one order in one batch: one decision.
func TestOneDecisionPerOrderInABatch(t *testing.T) {
	t.Parallel()
	pool := schematest.NewPool(t)
	p := newPayment(t, 0)
	a, b := uuid.New(), uuid.New()
	out := schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
		return p.Handle(context.Background(), tx, []event.Event{reserved(t, a), reserved(t, b), reserved(t, a)})
	})
	if len(out) != 2 || out[0].OrderID != a || out[1].OrderID != b {
		t.Fatalf("emitted %+v, want one decision for a, then b", out)
	}
}

func expired(t *testing.T, order uuid.UUID) event.Event {
	t.Helper()
	ev, err := event.New(event.OrderExpired, order, "status", event.Expired{Deadline: "15m0s"})
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

// Whichever of an order's InventoryReserved and OrderExpired payment sees
// first decides, in one batch or in two: an expiry first is a decline
// without a charge and the reservation after it charges nothing; a charge
// first stands and the expiry after it changes nothing.
func TestExpiryAndChargeDecideOnce(t *testing.T) {
	for _, tc := range []struct {
		name     string
		batches  func(t *testing.T, order uuid.UUID) [][]event.Event
		want     event.Type
		status   string
		declined string
	}{
		{"expiry first, one batch", func(t *testing.T, o uuid.UUID) [][]event.Event {
			return [][]event.Event{{expired(t, o), reserved(t, o)}}
		}, event.PaymentFailed, "DECLINED", payment.ExpiredReason},
		{"expiry first, two batches", func(t *testing.T, o uuid.UUID) [][]event.Event {
			return [][]event.Event{{expired(t, o)}, {reserved(t, o)}}
		}, event.PaymentFailed, "DECLINED", payment.ExpiredReason},
		{"charge first, one batch", func(t *testing.T, o uuid.UUID) [][]event.Event {
			return [][]event.Event{{reserved(t, o), expired(t, o)}}
		}, event.PaymentCompleted, "COMPLETED", ""},
		{"charge first, two batches", func(t *testing.T, o uuid.UUID) [][]event.Event {
			return [][]event.Event{{reserved(t, o)}, {expired(t, o)}}
		}, event.PaymentCompleted, "COMPLETED", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pool := schematest.NewPool(t)
			p := newPayment(t, 0)
			order := uuid.New()
			var out []event.Event
			for _, b := range tc.batches(t, order) {
				out = append(out, schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
					return p.Handle(context.Background(), tx, b)
				})...)
			}
			if len(out) != 1 || out[0].Type != tc.want {
				t.Fatalf("emitted %+v, want one %s", out, tc.want)
			}
			if n := schematest.Int(t, pool, `SELECT count(*) FROM payments WHERE order_id = $1 AND status = $2 AND coalesce(reason, '') = $3`,
				order, tc.status, tc.declined); n != 1 {
				t.Fatalf("%d %s payments stored, want 1", n, tc.status)
			}
		})
	}
}

// A refund is decided once per order, in its own row, and only for a
// completed payment: ShipmentCancelled twice (two event ids, as after an
// inbox prune), in one batch and in two, refunds the charge once; for a
// declined order it refunds nothing. A cancel reaching payment after its
// charge changes nothing there (delivery answers it).
func TestRefundOncePerCompletedPayment(t *testing.T) {
	pool := schematest.NewPool(t)
	p := newPayment(t, 0)
	ctx := context.Background()
	withheld := func(order uuid.UUID) event.Event {
		ev, err := event.New(event.ShipmentCancelled, order, "delivery", event.Failed{Reason: "order cancelled before shipping"})
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	cancel := func(order uuid.UUID) event.Event {
		ev, err := event.New(event.OrderCancelRequested, order, "api", event.CancelRequested{RequestedBy: "u1"})
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	paid, declined := uuid.New(), uuid.New()
	schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
		return p.Handle(ctx, tx, []event.Event{reserved(t, paid), cancel(declined), reserved(t, declined)})
	})
	if out := schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
		return p.Handle(ctx, tx, []event.Event{cancel(paid)})
	}); len(out) != 0 {
		t.Fatalf("a cancel after the charge emitted %+v, want nothing", out)
	}
	out := schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
		return p.Handle(ctx, tx, []event.Event{withheld(paid), withheld(paid), withheld(declined)})
	})
	again := schematest.InTx(t, pool, func(tx pgx.Tx) ([]event.Event, error) {
		return p.Handle(ctx, tx, []event.Event{withheld(paid)})
	})
	if len(out) != 1 || out[0].Type != event.PaymentRefunded || out[0].OrderID != paid || len(again) != 0 {
		t.Fatalf("emitted %+v then %+v, want one PaymentRefunded for the paid order", out, again)
	}
	var r event.Refunded
	if err := out[0].Decode(&r); err != nil || r.AmountCents != 4200 {
		t.Fatalf("refund %+v (%v), want the 4200 cents charged", r, err)
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM refunds f JOIN payments p USING (order_id)
		WHERE f.order_id = $1 AND f.payment_id = p.id AND f.id = $2 AND f.amount_cents = 4200`, paid, r.RefundID); n != 1 {
		t.Fatalf("%d matching refund rows, want 1", n)
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'DECLINED' AND reason = $2`, declined, payment.CancelledReason); n != 1 {
		t.Fatalf("the order cancelled before its charge has no declined decision")
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM refunds`); n != 1 {
		t.Fatalf("%d refunds, want 1", n)
	}
}
