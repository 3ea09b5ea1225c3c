package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/modules/event"
)

// run runs the prozess command line in-process and returns what it wrote.
func run(args ...string) (string, error) {
	cmd := app.NewRootCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

// `prozess orders get` shows an order and its trail from PostgreSQL;
// `prozess orders tail` (a real process) follows events, filtered by order
// or type, history first with --from-start and then live.
func TestOrdersGetAndTail(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	brokers := strings.Join(r.sys.Brokers(), ",")
	db := []string{"--database-url", e.dbURL, "--log-level", "warn"}

	shipped := r.order(t, "u1", "", mouse(2)).OrderID.String()
	r.await(t, shipped, 15*time.Second)
	r.awaitTrail(t, shipped, event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.OrderShipped)
	noStock := r.order(t, "u1", "", event.Item{ProductID: "prod-webcam", Qty: 1}).OrderID.String()

	out, err := run(append([]string{"orders", "get", shipped}, db...)...)
	if err != nil {
		t.Fatalf("orders get: %v", err)
	}
	for _, want := range []string{"status  SHIPPED", "user    u1", "amount  59.98", "prod-mouse", "events (4)", "OrderShipped"} {
		if !strings.Contains(out, want) {
			t.Errorf("orders get output lacks %q:\n%s", want, out)
		}
	}
	out, err = run(append([]string{"orders", "get", shipped, "--json"}, db...)...)
	var doc struct {
		Status event.Status `json:"status"`
		Events []struct {
			Type string `json:"type"`
		} `json:"events"`
	}
	if err != nil || json.Unmarshal([]byte(out), &doc) != nil || doc.Status != event.StatusShipped || len(doc.Events) != 4 {
		t.Errorf("orders get --json: %v %+v\n%s", err, doc, out)
	}

	// Mistakes name what was wrong.
	for _, c := range []struct {
		args []string
		want string
	}{
		{append([]string{"orders", "get", "nope"}, db...), "ORDER_ID"},
		{append([]string{"orders", "get", uuid.NewString()}, db...), "no such order"},
		{[]string{"orders", "tail"}, "--kafka-brokers"},
		{[]string{"orders", "tail", "--kafka-brokers", brokers, "--type", "Bogus"}, "--type"},
		{[]string{"orders", "tail", "--kafka-brokers", brokers, "--order", "x"}, "--order"},
	} {
		if _, err := run(c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: error %v, want one naming %s", c.args, err, c.want)
		}
	}

	// One order's history, exactly, in order.
	one := spawn(t, nil, "orders", "tail", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--from-start", "--json", "--order", shipped)
	for i, want := range []event.Type{event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.OrderShipped} {
		l := one.await(t, "event "+string(want), func(m map[string]any) bool { return m["type"] != nil })
		if l["type"] != string(want) || l["order_id"] != shipped {
			t.Fatalf("line %d: %v, want %s of %s", i, l, want, shipped)
		}
	}
	// Only one type: the out-of-stock order from history, then one placed
	// while tailing.
	failed := spawn(t, nil, "orders", "tail", "--kafka-brokers", brokers, "--topic", cfg.Topic, "--from-start", "--json", "--type", "InventoryFailed")
	l := failed.await(t, "the first InventoryFailed", func(m map[string]any) bool { return m["type"] != nil })
	if l["order_id"] != noStock || l["status"] != string(event.StatusCancelled) {
		t.Fatalf("first line %v, want InventoryFailed of %s", l, noStock)
	}
	later := r.order(t, "u1", "", event.Item{ProductID: "prod-webcam", Qty: 1}).OrderID.String()
	l = failed.await(t, "the live InventoryFailed", func(m map[string]any) bool { return m["type"] != nil })
	if l["order_id"] != later || l["type"] != string(event.InventoryFailed) {
		t.Fatalf("live line %v, want InventoryFailed of %s", l, later)
	}
	one.stop(t)
	failed.stop(t)
}
