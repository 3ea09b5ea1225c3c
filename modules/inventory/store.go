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

// order is one OrderCreated of a batch and, after apply, its outcome.
type order struct {
	id      uuid.UUID
	created event.Created
	short   *event.Failed // why it could not be reserved; nil when reserved
}

// apply releases what the declined orders hold and reserves the new orders,
// in a constant number of statements whatever the batch size:
//  1. mark the declined orders' reservations released, reading them back;
//  2. lock every product the batch touches, in id order (so concurrent
//     batches cannot deadlock), and read its stock;
//  3. decide each new order in batch order against that stock, all of its
//     items or none;
//  4. write the net stock change per product, the new reservations and the
//     orders it could not serve (cancelled_orders).
func apply(ctx context.Context, tx pgx.Tx, declined []uuid.UUID, orders []order) (map[uuid.UUID][]event.Item, error) {
	released := map[uuid.UUID][]event.Item{}
	if len(declined) > 0 {
		rows, err := tx.Query(ctx, `
			UPDATE reservations SET released_at = now()
			WHERE order_id = ANY($1) AND released_at IS NULL
			RETURNING order_id, product_id, qty`, declined)
		if err != nil {
			return nil, fmt.Errorf("marking reservations released: %w", err)
		}
		var id uuid.UUID
		var it event.Item
		if _, err := pgx.ForEachRow(rows, []any{&id, &it.ProductID, &it.Qty}, func() error {
			released[id] = append(released[id], it)
			return nil
		}); err != nil {
			return nil, fmt.Errorf("marking reservations released: %w", err)
		}
		for id, items := range released {
			released[id] = merge(items)
		}
		// Remembered whether or not they held anything: a reservation
		// arriving after its order's release (a late or replayed
		// OrderCreated, or one behind an expiry in this very batch) must
		// fail, or it would hold stock nobody gives back.
		if _, err := tx.Exec(ctx, `INSERT INTO cancelled_orders (order_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING`, declined); err != nil {
			return nil, fmt.Errorf("remembering cancelled orders: %w", err)
		}
	}
	if err := refuseCancelled(ctx, tx, orders); err != nil {
		return nil, err
	}

	var products []string
	for _, items := range released {
		for _, it := range items {
			products = append(products, it.ProductID)
		}
	}
	for _, o := range orders {
		for _, it := range o.created.Items {
			products = append(products, it.ProductID)
		}
	}
	if len(products) == 0 {
		return released, nil
	}
	slices.Sort(products)
	products = slices.Compact(products)
	rows, err := tx.Query(ctx, `SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE`, products)
	if err != nil {
		return nil, fmt.Errorf("locking products: %w", err)
	}
	stock := make(map[string]int64, len(products))
	var pid string
	var n int64
	if _, err := pgx.ForEachRow(rows, []any{&pid, &n}, func() error { stock[pid] = n; return nil }); err != nil {
		return nil, fmt.Errorf("reading stock: %w", err)
	}
	delta := map[string]int64{}
	for _, items := range released {
		for _, it := range items {
			stock[it.ProductID] += int64(it.Qty)
			delta[it.ProductID] += int64(it.Qty)
		}
	}
	var resOrders []uuid.UUID
	var resProducts []string
	var resQtys []int32
	var failed []uuid.UUID
	for i := range orders {
		o := &orders[i]
		if o.short != nil {
			continue // cancelled already
		}
		want := merge(o.created.Items)
		o.short = check(want, stock)
		if o.short != nil {
			failed = append(failed, o.id)
			continue
		}
		for _, it := range want {
			stock[it.ProductID] -= int64(it.Qty)
			delta[it.ProductID] -= int64(it.Qty)
			resOrders, resProducts, resQtys = append(resOrders, o.id), append(resProducts, it.ProductID), append(resQtys, int32(it.Qty))
		}
	}
	var ids []string
	var deltas []int64
	for _, p := range products {
		if d := delta[p]; d != 0 {
			ids, deltas = append(ids, p), append(deltas, d)
		}
	}
	if len(ids) > 0 {
		if _, err := tx.Exec(ctx, `
			UPDATE products p SET stock = p.stock + d.delta
			FROM unnest($1::text[], $2::bigint[]) AS d(id, delta)
			WHERE p.id = d.id`, ids, deltas); err != nil {
			return nil, fmt.Errorf("changing stock: %w", err)
		}
	}
	// An order that could not be served is cancelled (InventoryFailed):
	// remembered like a released one, in the same transaction, so its
	// OrderCreated coming again after the inbox forgot it (a pruned inbox
	// row, a group restarting at the log start) fails again instead of
	// reserving stock, and payment and delivery never see it.
	if len(failed) > 0 {
		if _, err := tx.Exec(ctx, `INSERT INTO cancelled_orders (order_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING`, failed); err != nil {
			return nil, fmt.Errorf("remembering %d orders inventory could not serve: %w", len(failed), err)
		}
	}
	if len(resOrders) > 0 {
		if _, err := tx.Exec(ctx, `
			INSERT INTO reservations (order_id, product_id, qty)
			SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[])`, resOrders, resProducts, resQtys); err != nil {
			return nil, fmt.Errorf("recording reservations: %w", err)
		}
	}
	return released, nil
}

// CancelledReason is the InventoryFailed reason for an OrderCreated whose
// order was cancelled (payment failed or the saga deadline passed) before
// inventory reserved anything for it.
const CancelledReason = "order cancelled before its stock was reserved"

// refuseCancelled marks the orders already cancelled (payment failed, or
// inventory could not serve them before): they get InventoryFailed instead
// of a reservation.
func refuseCancelled(ctx context.Context, tx pgx.Tx, orders []order) error {
	if len(orders) == 0 {
		return nil
	}
	ids := make([]uuid.UUID, len(orders))
	for i, o := range orders {
		ids[i] = o.id
	}
	rows, err := tx.Query(ctx, `SELECT order_id FROM cancelled_orders WHERE order_id = ANY($1)`, ids)
	if err != nil {
		return fmt.Errorf("looking up cancelled orders: %w", err)
	}
	cancelled, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return fmt.Errorf("looking up cancelled orders: %w", err)
	}
	for i := range orders {
		if slices.Contains(cancelled, orders[i].id) {
			orders[i].short = &event.Failed{Reason: CancelledReason}
		}
	}
	return nil
}

// check returns why an order's items cannot all be had, or nil.
func check(want []event.Item, stock map[string]int64) *event.Failed {
	for _, it := range want {
		have, ok := stock[it.ProductID]
		switch {
		case !ok:
			return &event.Failed{Reason: "unknown product", ProductID: it.ProductID}
		case have < int64(it.Qty):
			return &event.Failed{Reason: fmt.Sprintf("out of stock: %d wanted, %d left", it.Qty, have), ProductID: it.ProductID}
		}
	}
	return nil
}

// merge sums quantities per product and sorts by product id.
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
