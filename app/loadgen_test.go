package app_test

import (
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/app/loadgen"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/event"
)

// A load run that cancels half of its orders, at random moments within
// 20 ms of their acceptance, leaves a record `prozess check` finds clean:
// every accepted cancel ended its order CANCELLED (declined, or charged
// and refunded), a refused one had shipped, and every order ended.
func TestLoadgenCancellingAShareLeavesCheckClean(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	out, err := runCLI(t, "loadgen", "--url", r.url, "--database-url", e.dbURL, "--kafka-brokers", strings.Join(r.sys.Brokers(), ","),
		"--topic", cfg.Topic, "--rate", "60", "--duration", "4s", "--warmup", "0", "--deadline", "30s",
		"--cancel-rate", "0.5", "--cancel-within", "20ms", "--json", "--log-level", "warn")
	if err != nil {
		t.Fatalf("loadgen: %v\n%s", err, out)
	}
	var res struct {
		Runs []loadgen.Result `json:"runs"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &res); err != nil || len(res.Runs) != 1 {
		t.Fatalf("loadgen output: %v\n%s", err, out)
	}
	run := res.Runs[0]
	c := run.Cancels
	t.Logf("sent %d, unfinished %d, outcomes %v, cancels %+v", run.Sent, run.Unfinished, run.Outcomes, c)
	// How the cancels split between before the charge, between charge and
	// shipment, and after it depends on the machine's speed; that each
	// ends right is held by check below and by TestCancelRacingChargeAndShipment.
	// Within 20 ms, not more: on a fast machine (the clean room's embedded
	// servers) an order ships in a few milliseconds, and cancels spread
	// over 300 ms once all came after the shipment (122 of 122 refused).
	if c == nil || c.Sent < run.Accepted/4 || c.Errors != 0 || c.Accepted == 0 || c.Accepted+c.Refused != c.Sent {
		t.Fatalf("cancels %+v for %d accepted orders: want about half cancelled, some accepted, no errors", c, run.Accepted)
	}
	if run.Unfinished != 0 || run.Outcomes[string(event.OrderShipped)] == 0 {
		t.Fatalf("outcomes %v, %d unfinished: want every order ended, the uncancelled ones shipped", run.Outcomes, run.Unfinished)
	}
	e.awaitQuiet(30 * time.Second)
	if n := e.count(`SELECT count(*) FROM orders WHERE cancel_requested_at IS NOT NULL AND status = 'CANCELLED'`); n != int64(c.Accepted) {
		t.Fatalf("%d orders cancelled on request, for %d cancels accepted", n, c.Accepted)
	}
	report := e.checkClean(t, r.sys.Brokers())
	if !strings.Contains(report, "ok   refunds only for cancelled, unshipped orders") {
		t.Fatalf("check did not report the refund rule:\n%s", report)
	}
}

// TestLoadgenCatalogueOrdersShip runs `prozess loadgen`'s catalogue mode
// against a whole system for two seconds: every order it sends is accepted
// and shipped, they buy several products of the catalogue (orders of more
// than one line among them), and stock is conserved across the catalogue.
func TestLoadgenCatalogueOrdersShip(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	cat, err := loadgen.NewCatalogue(50, 3, 1.1, 7)
	if err != nil {
		t.Fatal(err)
	}
	if err := cat.Ensure(t.Context(), e.dbURL); err != nil {
		t.Fatal(err)
	}
	run, err := loadgen.New(t.Context(), loadgen.Config{URL: r.url, Kafka: saga.Conn{Brokers: r.sys.Brokers()}, Topic: cfg.Topic,
		Rate: 40, Duration: 2 * time.Second, MaxInFlight: 64, Deadline: 30 * time.Second, Catalogue: cat, APIKey: e.keyFor("loadgen")},
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer run.Close()
	res, err := run.Run(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if res.Errors+res.Dropped+res.Unfinished > 0 || res.Finished != res.Sent || res.Outcomes["OrderShipped"] != res.Sent {
		t.Fatalf("sent %d: %d errors %v, %d dropped, %d unfinished, outcomes %v", res.Sent, res.Errors, res.FirstErrors, res.Dropped, res.Unfinished, res.Outcomes)
	}
	if n := e.count(`SELECT count(*) FROM order_items WHERE product_id NOT LIKE $1`, loadgen.CataloguePrefix+"%"); n > 0 {
		t.Errorf("%d order lines buy products outside the catalogue", n)
	}
	if n := e.count(`SELECT count(DISTINCT product_id) FROM order_items`); n < 10 {
		t.Errorf("the orders bought %d distinct products of 50", n)
	}
	if n := e.count(`SELECT count(*) FROM (SELECT order_id FROM order_items GROUP BY order_id HAVING count(*) > 1) m`); n == 0 {
		t.Error("no order of more than one line")
	}
	// Every line was reserved as ordered, and every unit received is in
	// stock or held by a reservation.
	if n := e.count(`SELECT count(*) FROM order_items i LEFT JOIN reservations r USING (order_id, product_id)
		WHERE r.qty IS DISTINCT FROM i.qty OR r.released_at IS NOT NULL`); n > 0 {
		t.Errorf("%d order lines not reserved as ordered", n)
	}
	if n := e.count(`SELECT count(*) FROM products p WHERE p.id LIKE $1 AND p.received <> p.stock +
		(SELECT coalesce(sum(r.qty), 0) FROM reservations r WHERE r.product_id = p.id AND r.released_at IS NULL)`,
		loadgen.CataloguePrefix+"%"); n > 0 {
		t.Errorf("%d catalogue products whose stock does not add up", n)
	}
	if !strings.HasPrefix(cat.Products()[0], loadgen.CataloguePrefix) {
		t.Errorf("catalogue ids %v", cat.Products()[:3])
	}
}
