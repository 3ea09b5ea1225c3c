package app_test

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/app/loadgen"
	"github.com/prozess/prozess/app/saga"
)

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
