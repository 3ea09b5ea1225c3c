package api

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/prozess/prozess/modules/deadletter"
)

func (a *API) idemKey(user, key string) string { return a.prefix + "idem:" + user + ":" + key }

// rememberedKey is the fast path for a repeated Idempotency-Key. It answers
// only on a sure match, confirmed in PostgreSQL (the order exists, for this
// user and key: Redis never answers for what the database does not have);
// anything else (miss, Redis down, other body, no such order) falls through
// to the writer, which decides.
func (a *API) rememberedKey(ctx context.Context, user, key string, hash []byte) (uuid.UUID, bool) {
	rctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	var v string
	err := a.cache.Guard().Do(rctx, func(ctx context.Context) (err error) {
		v, err = a.rdb.Do(ctx, a.rdb.B().Get().Key(a.idemKey(user, key)).Build()).ToString()
		return err
	})
	if err != nil {
		return uuid.Nil, false
	}
	h, id, ok := strings.Cut(v, ":")
	if !ok || h != hex.EncodeToString(hash) {
		return uuid.Nil, false
	}
	oid, err := uuid.Parse(id)
	if err != nil {
		return uuid.Nil, false
	}
	var n int
	if err := a.pool.QueryRow(ctx, `SELECT count(*) FROM orders WHERE id = $1 AND user_id = $2 AND idempotency_key = $3`,
		oid, user, key).Scan(&n); err != nil || n != 1 {
		return uuid.Nil, false
	}
	return oid, true
}

func (a *API) rememberKey(ctx context.Context, user, key string, hash []byte, id uuid.UUID) {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	v := hex.EncodeToString(hash) + ":" + id.String()
	cmd := a.rdb.B().Set().Key(a.idemKey(user, key)).Value(v).Ex(idempotencyTTL).Build()
	if err := a.cache.Guard().Do(ctx, func(ctx context.Context) error { return a.rdb.Do(ctx, cmd).Error() }); err != nil {
		a.log.WarnContext(ctx, "idempotency key not cached", "order_id", id, "err", err)
	}
}

func (a *API) loadOrder(ctx context.Context, id uuid.UUID) (Order, error) {
	return ReadOrder(ctx, a.pool, id)
}

// ErrNotFound is the answer for an order that does not exist (or that the
// caller may not read).
var ErrNotFound = errNotFound

// ReadOrder reads an order and its items from PostgreSQL, the source of
// truth, with no access check (operators' `prozess orders get`).
func ReadOrder(ctx context.Context, db Querier, id uuid.UUID) (Order, error) {
	o := Order{OrderID: id}
	err := db.QueryRow(ctx, `SELECT user_id, status, amount_cents, created_at FROM orders WHERE id = $1`, id).
		Scan(&o.UserID, &o.Status, &o.AmountCents, &o.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return Order{}, errNotFound
	}
	if err != nil {
		return Order{}, fmt.Errorf("reading order %s: %w", id, err)
	}
	rows, err := db.Query(ctx, `SELECT product_id, qty, price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id`, id)
	if err != nil {
		return Order{}, fmt.Errorf("reading items of order %s: %w", id, err)
	}
	if o.Items, err = pgx.CollectRows(rows, pgx.RowToStructByPos[OrderItem]); err != nil {
		return Order{}, fmt.Errorf("reading items of order %s: %w", id, err)
	}
	if o.DeadLetters, err = deadletter.ForOrder(ctx, db, id); err != nil {
		return Order{}, err
	}
	if o.Parked, err = deadletter.ParkedForOrder(ctx, db, id); err != nil {
		return Order{}, err
	}
	return o, nil
}

func (a *API) loadEvents(ctx context.Context, id uuid.UUID, p Principal) ([]AuditEvent, error) {
	var owner string
	err := a.pool.QueryRow(ctx, `SELECT user_id FROM orders WHERE id = $1`, id).Scan(&owner)
	if errors.Is(err, pgx.ErrNoRows) || err == nil && !canRead(p, owner) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("reading order %s: %w", id, err)
	}
	evs, err := ReadEvents(ctx, a.pool, id)
	if err != nil || p.Admin {
		return evs, err
	}
	// The owner's view: a re-drive's entry without the dead letter's
	// reason or the admin key that did it (see Order.viewedBy).
	for i, e := range evs {
		if e.Type != deadletter.TrailType {
			continue
		}
		if evs[i].Data, err = deadletter.ForOwnerTrail(e.Data); err != nil {
			return nil, fmt.Errorf("order %s: %w", id, err)
		}
		evs[i].Source = "admin"
	}
	return evs, nil
}

// ReadEvents reads an order's audit trail, oldest first, with no access
// check; an order without events has an empty trail.
func ReadEvents(ctx context.Context, db Querier, id uuid.UUID) ([]AuditEvent, error) {
	rows, err := db.Query(ctx, `
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
	if evs == nil {
		evs = []AuditEvent{}
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
