package loadgen

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"

	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
)

// Catalogue is a shop's worth of products for load orders to buy: n
// products whose popularity follows a Zipf law (the k-th most popular is
// bought about k^-s as often as the first), each order a few distinct lines.
// One product bought by every order (Config.Product) is the other mode: the
// worst case of one hot stock row, which every inventory batch locks, and
// no shop's real traffic.
type Catalogue struct {
	ids   []string // most popular first
	lines int

	mu   sync.Mutex // rand.Rand and rand.Zipf are not safe for concurrent use
	rng  *rand.Rand
	zipf *rand.Zipf
}

// CataloguePrefix names the catalogue's products: load-0000 (the most
// popular), load-0001, ...
const CataloguePrefix = "load-"

// NewCatalogue is n products (n >= 2) with Zipf exponent s (> 1) and orders
// of 1 to lines distinct lines (at most n and event.MaxItems), drawn from
// seed, so two runs with the same flags send the same mix.
func NewCatalogue(n, lines int, s float64, seed uint64) (*Catalogue, error) {
	switch {
	case n < 2:
		return nil, fmt.Errorf("--products %d: a catalogue needs at least 2 products (1 is the one-product mode, --product)", n)
	case lines < 1 || lines > min(n, event.MaxItems):
		return nil, fmt.Errorf("--lines %d: must be 1 to %d (the products in the catalogue, at most %d)", lines, min(n, event.MaxItems), event.MaxItems)
	case !(s > 1):
		return nil, fmt.Errorf("--zipf %g: the exponent must be greater than 1", s)
	}
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%04d", CataloguePrefix, i)
	}
	rng := rand.New(rand.NewPCG(seed, 0x70726f7a))
	return &Catalogue{ids: ids, lines: lines, rng: rng, zipf: rand.NewZipf(rng, s, 1, uint64(n-1))}, nil
}

// Products lists the catalogue's ids, most popular first.
func (c *Catalogue) Products() []string { return c.ids }

// Order draws one order's lines: 1 to lines of them, uniformly, each a
// distinct product drawn by popularity, one or two units each.
func (c *Catalogue) Order() []event.Item {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 1 + c.rng.IntN(c.lines)
	items := make([]event.Item, 0, n)
	seen := make(map[uint64]bool, n)
	for len(items) < n {
		k := c.zipf.Uint64()
		if seen[k] {
			continue // a product is one line (the API refuses it twice)
		}
		seen[k] = true
		items = append(items, event.Item{ProductID: c.ids[k], Qty: 1 + c.rng.IntN(2)})
	}
	return items
}

// Ensure creates the catalogue's products, or restocks them, with stock
// enough for any run, as EnsureProduct does for the one product: a run
// measures the saga's full path, not products running out.
func (c *Catalogue) Ensure(ctx context.Context, url string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("cannot reach PostgreSQL to prepare the load catalogue: %w", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, restock+` SELECT id, 'Load test item ' || id, 100, `+ampleStock+`, `+ampleStock+` FROM unnest($1::text[]) AS id
		ON CONFLICT (id) DO UPDATE SET `+topUp, c.ids); err != nil {
		return fmt.Errorf("preparing the load catalogue (%d products): %w", len(c.ids), err)
	}
	return nil
}

// restock, ampleStock and topUp are the statement EnsureProduct and
// Catalogue.Ensure share: stock and received rise together, so stock
// conservation holds.
const (
	restock    = `INSERT INTO products (id, name, price_cents, stock, received)`
	ampleStock = `1000000000`
	topUp      = `stock = products.stock + GREATEST(0, 1000000000 - products.stock),
			received = products.received + GREATEST(0, 1000000000 - products.stock)`
)
