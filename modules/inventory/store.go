package inventory

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
)

// reserve takes every item's quantity from stock, or nothing. It locks the
// products in id order, so concurrent reservations cannot deadlock, and
// checks them all before changing any. It returns a non-nil Failed when an
// item cannot be had.
func reserve(ctx context.Context, tx pgx.Tx, orderID uuid.UUID, items []event.Item) (*event.Failed, error) {
	want := merge(items)
	ids, qtys := columns(want)
	rows, err := tx.Query(ctx, `SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE`, ids)
	if err != nil {
		return nil, fmt.Errorf("locking products: %w", err)
	}
	stock := make(map[string]int64, len(ids))
	var id string
	var n int64
	if _, err := pgx.ForEachRow(rows, []any{&id, &n}, func() error { stock[id] = n; return nil }); err != nil {
		return nil, fmt.Errorf("reading stock: %w", err)
	}
	for _, it := range want {
		have, ok := stock[it.ProductID]
		switch {
		case !ok:
			return &event.Failed{Reason: "unknown product", ProductID: it.ProductID}, nil
		case have < int64(it.Qty):
			return &event.Failed{Reason: fmt.Sprintf("out of stock: %d wanted, %d left", it.Qty, have), ProductID: it.ProductID}, nil
		}
	}
	if _, err := tx.Exec(ctx, `
		UPDATE products p SET stock = p.stock - r.qty
		FROM unnest($1::text[], $2::int[]) AS r(id, qty)
		WHERE p.id = r.id`, ids, qtys); err != nil {
		return nil, fmt.Errorf("taking stock: %w", err)
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO reservations (order_id, product_id, qty)
		SELECT $1, * FROM unnest($2::text[], $3::int[])`, orderID, ids, qtys); err != nil {
		return nil, fmt.Errorf("recording reservation: %w", err)
	}
	return nil, nil
}

// release gives back what an order holds, exactly once: the reservation rows
// are marked released in the same statement that reads them.
func release(ctx context.Context, tx pgx.Tx, orderID uuid.UUID) ([]event.Item, error) {
	rows, err := tx.Query(ctx, `
		UPDATE reservations SET released_at = now()
		WHERE order_id = $1 AND released_at IS NULL
		RETURNING product_id, qty`, orderID)
	if err != nil {
		return nil, fmt.Errorf("marking reservation released: %w", err)
	}
	items, err := pgx.CollectRows(rows, pgx.RowToStructByPos[event.Item])
	if err != nil || len(items) == 0 {
		return nil, err
	}
	items = merge(items)
	ids, qtys := columns(items)
	// Same lock order as reserve.
	if _, err := tx.Exec(ctx, `SELECT 1 FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE`, ids); err != nil {
		return nil, fmt.Errorf("locking products: %w", err)
	}
	if _, err := tx.Exec(ctx, `
		UPDATE products p SET stock = p.stock + r.qty
		FROM unnest($1::text[], $2::int[]) AS r(id, qty)
		WHERE p.id = r.id`, ids, qtys); err != nil {
		return nil, fmt.Errorf("returning stock: %w", err)
	}
	return items, nil
}

// merge sums quantities per product and sorts by product id: the lock order.
func merge(items []event.Item) []event.Item {
	sum := make(map[string]int, len(items))
	for _, it := range items {
		sum[it.ProductID] += it.Qty
	}
	out := make([]event.Item, 0, len(sum))
	for id, q := range sum {
		out = append(out, event.Item{ProductID: id, Qty: q})
	}
	slices.SortFunc(out, func(a, b event.Item) int { return strings.Compare(a.ProductID, b.ProductID) })
	return out
}

func columns(items []event.Item) ([]string, []int32) {
	ids := make([]string, len(items))
	qtys := make([]int32, len(items))
	for i, it := range items {
		ids[i], qtys[i] = it.ProductID, int32(it.Qty)
	}
	return ids, qtys
}
