package app_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/event"
)

// newer rewrites a record as a newer producer of the same major would write
// it: a higher minor version and a field this build does not know.
func newer(t *testing.T, r *kgo.Record) *kgo.Record {
	t.Helper()
	var payload map[string]any
	if err := json.Unmarshal(r.Value, &payload); err != nil {
		t.Fatal(err)
	}
	payload["added_in_1_3"] = map[string]any{"retry_after_s": 30}
	b, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	r.Value = b
	for i, h := range r.Headers {
		if h.Key == "ce_schemaversion" {
			r.Headers[i].Value = []byte("1.3")
		}
	}
	return r
}

// A rolling upgrade: a newer payment (schema 1.3, an extra field) declines
// an order; the older inventory and status read it, the stock comes back
// and the order is cancelled. Before, the exact version and unknown fields
// were refused and the stock was never released. A newer OrderCreated (an
// order another api version wrote) is reserved by inventory and recorded
// by status, a newer InventoryReserved charged by payment, a newer
// PaymentCompleted shipped by delivery; nothing is dead-lettered.
func TestEventsFromANewerProducerAreApplied(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()                               // a partial serve uses the brokers it is given
	r := e.start(cfg, "api", "inventory", "delivery", "status") // payment is "upgraded": the test plays it
	initial := r.stock(t)
	o := r.order(t, "u1", "", mouse(2))
	r.awaitStatus(t, o.OrderID.String(), event.StatusReserved, 20*time.Second)
	declined, err := event.New(event.PaymentFailed, o.OrderID, "payment", event.Failed{Reason: "card declined"})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), newer(t, declined.Record(cfg.Topic))).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if got := r.await(t, o.OrderID.String(), 20*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED by the newer PaymentFailed", got.Status)
	}
	r.awaitTrail(t, o.OrderID.String(), event.OrderCreated, event.InventoryReserved, event.PaymentFailed, event.InventoryReleased)
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("prod-mouse stock %d, want %d back", got["prod-mouse"], initial["prod-mouse"])
	}

	second := e.insertOrder()
	created, err := event.New(event.OrderCreated, second, "api", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(t.Context(), newer(t, created.Record(cfg.Topic))).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if got := r.awaitStatus(t, second.String(), event.StatusReserved, 20*time.Second); got.Status != event.StatusReserved {
		t.Fatalf("newer OrderCreated: order is %s, want INVENTORY_RESERVED", got.Status)
	}
	// Payment reads a newer InventoryReserved and delivery a newer
	// PaymentCompleted: two more orders, each picked up mid-saga.
	third, fourth := e.insertOrder(), e.insertOrder()
	reserved, err := event.New(event.InventoryReserved, third, "inventory", event.Reserved{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	paid, err := event.New(event.PaymentCompleted, fourth, "payment", event.Paid{PaymentID: uuid.New(), AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(t.Context(), newer(t, reserved.Record(cfg.Topic)), newer(t, paid.Record(cfg.Topic))).FirstErr(); err != nil {
		t.Fatal(err)
	}
	cfg.PaymentDeclineRate = 0
	e.start(cfg, "payment") // the older payment, this time
	for _, id := range []uuid.UUID{third, fourth} {
		if got := r.await(t, id.String(), 20*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s, picked up from a newer event, ended %s", id, got.Status)
		}
	}
	dls, err := saga.ReadDeadLetters(t.Context(), saga.Conn{Brokers: r.sys.Brokers()}, cfg.DLQTopic())
	if err != nil || len(dls) != 0 {
		t.Fatalf("%d dead letters (%v), want none", len(dls), err)
	}
}
