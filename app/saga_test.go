package app_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/event"
)

func TestOrderReachesShipped(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	before := r.stock(t)
	o := r.order(t, "u1", "", mouse(2), event.Item{ProductID: "prod-keyboard", Qty: 1})
	got := r.await(t, o.OrderID.String(), 15*time.Second)
	if got.Status != event.StatusShipped || got.AmountCents != 2*2999+8999 {
		t.Fatalf("order %+v, want SHIPPED for 14997 cents", got)
	}
	r.awaitTrail(t, o.OrderID.String(), event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.OrderShipped)
	after := r.stock(t)
	if after["prod-mouse"] != before["prod-mouse"]-2 || after["prod-keyboard"] != before["prod-keyboard"]-1 {
		t.Fatalf("stock %v -> %v, want mouse -2 and keyboard -1", before, after)
	}
}

func TestZeroStockOrderIsCancelled(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	before := r.stock(t)
	o := r.order(t, "u1", "", event.Item{ProductID: "prod-webcam", Qty: 1}, mouse(1))
	if got := r.await(t, o.OrderID.String(), 15*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("zero-stock order ended %s", got.Status)
	}
	r.awaitTrail(t, o.OrderID.String(), event.OrderCreated, event.InventoryFailed)
	if after := r.stock(t); after["prod-mouse"] != before["prod-mouse"] || after["prod-webcam"] != 0 {
		t.Fatalf("stock %v -> %v, want unchanged", before, after)
	}
	if n := e.count(`SELECT count(*) FROM payments`); n != 0 {
		t.Fatalf("%d payments for an order that never had stock", n)
	}
}

func TestDeclinedPaymentCancelsAndGivesStockBack(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.PaymentDeclineRate = 1
	r := e.start(cfg)
	before := r.stock(t)
	o := r.order(t, "u1", "", mouse(3))
	if got := r.await(t, o.OrderID.String(), 15*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("declined order ended %s", got.Status)
	}
	r.awaitTrail(t, o.OrderID.String(), event.OrderCreated, event.InventoryReserved, event.PaymentFailed, event.InventoryReleased)
	if after := r.stock(t); after["prod-mouse"] != before["prod-mouse"] {
		t.Fatalf("mouse stock %d -> %d, want it given back exactly", before["prod-mouse"], after["prod-mouse"])
	}
	if n := e.count(`SELECT count(*) FROM shipments`); n != 0 {
		t.Fatalf("%d shipments for a declined order", n)
	}
}

func TestIdempotentResubmitCreatesNothing(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	first := r.order(t, "u1", "checkout-42", mouse(1))
	r.await(t, first.OrderID.String(), 15*time.Second)
	again := r.order(t, "u1", "checkout-42", mouse(1))
	if again != first {
		t.Fatalf("resubmit answered %+v, first answer was %+v", again, first)
	}
	time.Sleep(300 * time.Millisecond) // room for a wrongly created second saga to show
	for _, table := range []string{"orders", "reservations", "payments", "shipments"} {
		if n := e.count("SELECT count(*) FROM " + table); n != 1 {
			t.Errorf("%d rows in %s after a resubmit, want 1", n, table)
		}
	}
}

// Many concurrent orders, some declined, some out of stock: every one ends
// terminal and stock is conserved (initial = current + shipped).
func TestConcurrentOrdersConserveStock(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.PaymentDeclineRate = 0.15
	r := e.start(cfg)
	// Little monitor stock, so some orders run out.
	if _, err := e.pool.Exec(t.Context(), `UPDATE products SET stock = 40, received = 40 WHERE id = 'prod-monitor'`); err != nil {
		t.Fatal(err)
	}
	before := r.stock(t)
	const n = 500
	ids := make([]string, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			items := []event.Item{mouse(1 + i%3)}
			if i%4 == 0 {
				items = append(items, event.Item{ProductID: "prod-monitor", Qty: 1})
			}
			ids[i] = r.order(t, fmt.Sprintf("user-%d", i%17), "", items...).OrderID.String()
		}()
	}
	wg.Wait()
	e.awaitQuiet(60 * time.Second) // terminal, declined stock released, outbox empty
	if got := e.count(`SELECT count(*) FROM orders`); got != n {
		t.Fatalf("%d orders stored, want %d", got, n)
	}
	after := r.stock(t)
	for product, initial := range before {
		shipped := e.count(`SELECT coalesce(sum(i.qty), 0) FROM order_items i JOIN orders o ON o.id = i.order_id
			WHERE o.status = 'SHIPPED' AND i.product_id = $1`, product)
		if initial != after[product]+shipped {
			t.Errorf("%s: initial %d != current %d + shipped %d", product, initial, after[product], shipped)
		}
	}
	shipped := e.count(`SELECT count(*) FROM orders WHERE status = 'SHIPPED'`)
	cancelled := e.count(`SELECT count(*) FROM orders WHERE status = 'CANCELLED'`)
	declined := e.count(`SELECT count(*) FROM payments WHERE status = 'DECLINED'`)
	if e.count(`SELECT count(*) FROM shipments`) != shipped || e.count(`SELECT count(*) FROM payments WHERE status = 'COMPLETED'`) != shipped {
		t.Errorf("shipments and completed payments must equal %d shipped orders", shipped)
	}
	if declined == 0 || cancelled <= declined {
		t.Errorf("want some declined and some out-of-stock orders: %d cancelled, %d declined", cancelled, declined)
	}
	t.Logf("%d orders: %d shipped, %d cancelled (%d declined)", n, shipped, cancelled, declined)
}
