// Package seed loads the demo catalogue. Loading adds products that are
// missing and never touches an existing product, so it is safe to run again
// and at every start: it cannot undo real orders' effect on stock.
package seed

import (
	"context"
	_ "embed"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/modules/api"
)

//go:embed catalogue.json
var catalogue []byte

// Product is one catalogue entry.
type Product struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	PriceCents int64  `json:"price_cents"`
	Stock      int64  `json:"stock"`
}

// Catalogue returns the demo products.
func Catalogue() ([]Product, error) {
	var ps []Product
	if err := json.Unmarshal(catalogue, &ps); err != nil {
		return nil, fmt.Errorf("decoding embedded catalogue: %w", err)
	}
	return ps, nil
}

// The demo API key, for user u1, so the README's walkthrough can be pasted
// as it is. It is public: `serve` creates and offers it only while the api
// listens on loopback only (or with --demo), warns while it works, and
// refuses to start beyond loopback while it is active.
const (
	DemoKeyID = "kdemo"
	DemoUser  = "u1"
	DemoKey   = "pz_kdemo_0000000000000000000000000000000000000000000000000000000000000000"
)

// Load inserts the demo products that are missing and, with demoKey, the
// demo API key if it was never created, and reports how many products it
// added. `serve` asks for the key only when the api listens on loopback
// only, or with --demo.
func Load(ctx context.Context, pool *pgxpool.Pool, demoKey bool) (int64, error) {
	if demoKey {
		if err := api.EnsureKey(ctx, pool, DemoKeyID, DemoUser, false, DemoKey); err != nil {
			return 0, fmt.Errorf("creating the demo API key: %w", err)
		}
	}
	ps, err := Catalogue()
	if err != nil {
		return 0, err
	}
	var ids, names []string
	var prices, stocks []int64
	for _, p := range ps {
		ids, names = append(ids, p.ID), append(names, p.Name)
		prices, stocks = append(prices, p.PriceCents), append(stocks, p.Stock)
	}
	tag, err := pool.Exec(ctx, `
		INSERT INTO products (id, name, price_cents, stock, received)
		SELECT i, n, p, s, s FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS t(i, n, p, s)
		ON CONFLICT (id) DO NOTHING`, ids, names, prices, stocks)
	if err != nil {
		return 0, fmt.Errorf("loading the demo catalogue: %w", err)
	}
	return tag.RowsAffected(), nil
}
