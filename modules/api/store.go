package api

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/event"
)

type insertResult struct {
	order    Order
	replayed bool
}

// insertOrder writes the order, its items and its OrderCreated event in one
// transaction. With an Idempotency-Key, the unique (user_id, idempotency_key)
// constraint decides the race between concurrent requests: exactly one
// inserts, the others find its order.
func (a *API) insertOrder(ctx context.Context, req CreateRequest, key string, hash []byte) (insertResult, error) {
	tx, err := a.pool.Begin(ctx)
	if err != nil {
		return insertResult{}, fmt.Errorf("beginning order transaction: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it is a no-op

	items, amount, err := price(ctx, tx, req.Items)
	if err != nil {
		return insertResult{}, err
	}
	id, err := uuid.NewV7()
	if err != nil {
		return insertResult{}, fmt.Errorf("new order id: %w", err)
	}
	o := Order{OrderID: id, UserID: req.UserID, Status: event.StatusCreated, AmountCents: amount, Items: items}
	err = tx.QueryRow(ctx, `
		INSERT INTO orders (id, user_id, status, amount_cents, idempotency_key, request_hash)
		VALUES ($1, $2, 'CREATED', $3, NULLIF($4, ''), $5)
		ON CONFLICT (user_id, idempotency_key) DO NOTHING
		RETURNING created_at`, id, req.UserID, amount, key, hash).Scan(&o.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		prev, err := a.orderForKey(ctx, tx, req.UserID, key, hash)
		return insertResult{order: Order{OrderID: prev}, replayed: true}, err
	}
	if err != nil {
		return insertResult{}, fmt.Errorf("inserting order: %w", err)
	}
	ids, qtys, prices := make([]string, len(items)), make([]int32, len(items)), make([]int64, len(items))
	for i, it := range items {
		ids[i], qtys[i], prices[i] = it.ProductID, int32(it.Qty), it.PriceCents
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO order_items (order_id, product_id, qty, price_cents)
		SELECT $1, * FROM unnest($2::text[], $3::int[], $4::bigint[])`, id, ids, qtys, prices); err != nil {
		return insertResult{}, fmt.Errorf("inserting order items: %w", err)
	}
	ev, err := event.New(event.OrderCreated, id, Name, event.Created{UserID: req.UserID, Items: req.Items, AmountCents: amount})
	if err != nil {
		return insertResult{}, err
	}
	if err := event.Emit(ctx, tx, a.topic, ev); err != nil {
		return insertResult{}, err
	}
	if err := tx.Commit(ctx); err != nil {
		return insertResult{}, fmt.Errorf("committing order: %w", err)
	}
	return insertResult{order: o}, nil
}

// price looks up every product's current price. An unknown product is the
// client's mistake (422), found before anything is written.
func price(ctx context.Context, tx pgx.Tx, req []event.Item) ([]OrderItem, int64, error) {
	ids := make([]string, len(req))
	for i, it := range req {
		ids[i] = it.ProductID
	}
	rows, err := tx.Query(ctx, `SELECT id, price_cents FROM products WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, 0, fmt.Errorf("reading prices: %w", err)
	}
	prices := make(map[string]int64, len(ids))
	var id string
	var p int64
	if _, err := pgx.ForEachRow(rows, []any{&id, &p}, func() error { prices[id] = p; return nil }); err != nil {
		return nil, 0, fmt.Errorf("reading prices: %w", err)
	}
	var unknown []string
	items := make([]OrderItem, len(req))
	var total int64
	for i, it := range req {
		p, ok := prices[it.ProductID]
		if !ok {
			unknown = append(unknown, it.ProductID)
		}
		items[i] = OrderItem{ProductID: it.ProductID, Qty: it.Qty, PriceCents: p}
		total += p * int64(it.Qty)
	}
	if len(unknown) > 0 {
		return nil, 0, &Error{Status: http.StatusUnprocessableEntity, Code: "unknown_product",
			Message: "no such product: " + strings.Join(unknown, ", ")}
	}
	return items, total, nil
}

// orderForKey finds the order an earlier request with the same key created,
// refusing a different body under the same key.
func (a *API) orderForKey(ctx context.Context, tx pgx.Tx, user, key string, hash []byte) (uuid.UUID, error) {
	var id uuid.UUID
	var prev []byte
	err := tx.QueryRow(ctx, `SELECT id, request_hash FROM orders WHERE user_id = $1 AND idempotency_key = $2`,
		user, key).Scan(&id, &prev)
	if err != nil {
		return uuid.Nil, fmt.Errorf("reading order for idempotency key: %w", err)
	}
	if !bytes.Equal(prev, hash) {
		return uuid.Nil, errKeyReused
	}
	return id, nil
}

var errKeyReused = &Error{Status: http.StatusUnprocessableEntity, Code: "idempotency_key_reused",
	Message: "this Idempotency-Key was used with a different request body"}

func (a *API) idemKey(user, key string) string { return a.prefix + "idem:" + user + ":" + key }

// rememberedKey is the fast path for a repeated Idempotency-Key. It answers
// only on a sure match; anything else (miss, Redis down, other body) falls
// through to PostgreSQL, which decides.
func (a *API) rememberedKey(ctx context.Context, user, key string, hash []byte) (uuid.UUID, bool) {
	v, err := a.rdb.Do(ctx, a.rdb.B().Get().Key(a.idemKey(user, key)).Build()).ToString()
	if err != nil {
		return uuid.Nil, false
	}
	h, id, ok := strings.Cut(v, ":")
	if !ok || h != hex.EncodeToString(hash) {
		return uuid.Nil, false
	}
	oid, err := uuid.Parse(id)
	return oid, err == nil
}

func (a *API) rememberKey(ctx context.Context, user, key string, hash []byte, id uuid.UUID) {
	v := hex.EncodeToString(hash) + ":" + id.String()
	cmd := a.rdb.B().Set().Key(a.idemKey(user, key)).Value(v).Ex(idempotencyTTL).Build()
	if err := a.rdb.Do(ctx, cmd).Error(); err != nil {
		a.log.Warn("idempotency key not cached", "order_id", id, "err", err)
	}
}

func (a *API) loadOrder(ctx context.Context, id uuid.UUID) (Order, error) {
	o := Order{OrderID: id}
	err := a.pool.QueryRow(ctx, `SELECT user_id, status, amount_cents, created_at FROM orders WHERE id = $1`, id).
		Scan(&o.UserID, &o.Status, &o.AmountCents, &o.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return Order{}, errNotFound
	}
	if err != nil {
		return Order{}, fmt.Errorf("reading order %s: %w", id, err)
	}
	rows, err := a.pool.Query(ctx, `SELECT product_id, qty, price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id`, id)
	if err != nil {
		return Order{}, fmt.Errorf("reading items of order %s: %w", id, err)
	}
	if o.Items, err = pgx.CollectRows(rows, pgx.RowToStructByPos[OrderItem]); err != nil {
		return Order{}, fmt.Errorf("reading items of order %s: %w", id, err)
	}
	return o, nil
}

func (a *API) loadEvents(ctx context.Context, id uuid.UUID) ([]AuditEvent, error) {
	var exists bool
	if err := a.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)`, id).Scan(&exists); err != nil {
		return nil, fmt.Errorf("reading order %s: %w", id, err)
	}
	if !exists {
		return nil, errNotFound
	}
	rows, err := a.pool.Query(ctx, `
		SELECT event_id, type, source, occurred_at, payload::text
		FROM order_events WHERE order_id = $1 ORDER BY seq`, id)
	if err != nil {
		return nil, fmt.Errorf("reading events of order %s: %w", id, err)
	}
	evs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (AuditEvent, error) {
		var e AuditEvent
		var data string
		err := r.Scan(&e.EventID, &e.Type, &e.Source, &e.Time, &data)
		e.Data = []byte(data)
		return e, err
	})
	if err != nil {
		return nil, fmt.Errorf("reading events of order %s: %w", id, err)
	}
	return evs, nil
}

func (a *API) loadProducts(ctx context.Context) ([]Product, error) {
	rows, err := a.pool.Query(ctx, `SELECT id, name, price_cents, stock FROM products ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("reading products: %w", err)
	}
	ps, err := pgx.CollectRows(rows, pgx.RowToStructByPos[Product])
	if err != nil {
		return nil, fmt.Errorf("reading products: %w", err)
	}
	return ps, nil
}
