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

// Load inserts the demo products that are missing and reports how many it
// added.
func Load(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
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
