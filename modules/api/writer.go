package api

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/modules/event"
)

// writer is the api's group commit: concurrent POSTs are written together,
// one transaction (and one WAL flush) for every order waiting when a writer
// is free. Under light load a batch is one order and nothing waits; under
// heavy load the per-order cost of a commit shrinks with the queue. Each
// order, its items and its OrderCreated event still commit together.
type writer struct {
	pool     *pgxpool.Pool
	topic    string
	queue    chan *pending
	maxBatch int
	// committed wakes the relay after a batch commits (nil: the relay's
	// poll finds the rows).
	committed func()
}

// pending is one POST waiting for its batch.
type pending struct {
	req   CreateRequest
	key   string
	hash  []byte
	trace map[string]string // the request's trace context, for OrderCreated
	done  chan written
}

type written struct {
	order    Order
	replayed bool
	err      error
}

func newWriter(pool *pgxpool.Pool, topic string, committed func()) *writer {
	return &writer{pool: pool, topic: topic, queue: make(chan *pending, 4096), maxBatch: 256, committed: committed}
}

// writers is how many batches may be in flight at once: one filling while
// the other commits keeps the database busy without queueing behind a
// flush. Two, not four: at 1200 orders/s on the 2-core machine, two writers'
// larger batches gave end-to-end p99 50 ms against 61-65 ms and POST p99
// 14 ms against 15-16 (same runs, docs/PERFORMANCE.md), and kept up at
// 2400/s with POST p99 26 ms against 46.
const writers = 2

// run serves the queue until ctx ends.
func (w *writer) run(ctx context.Context) {
	done := make(chan struct{})
	for range writers {
		go func() {
			defer func() { done <- struct{}{} }()
			for {
				select {
				case <-ctx.Done():
					return
				case p := <-w.queue:
					batch := []*pending{p}
				fill:
					for len(batch) < w.maxBatch {
						select {
						case p := <-w.queue:
							batch = append(batch, p)
						default:
							break fill
						}
					}
					w.write(batch)
				}
			}
		}()
	}
	for range writers {
		<-done
	}
}

// submit queues one order and waits for its batch to commit.
func (w *writer) submit(ctx context.Context, req CreateRequest, key string, hash []byte) (written, error) {
	p := &pending{req: req, key: key, hash: hash, trace: event.TraceOf(ctx), done: make(chan written, 1)}
	select {
	case w.queue <- p:
	case <-ctx.Done():
		return written{}, ctx.Err()
	}
	select {
	case res := <-p.done:
		return res, res.err
	case <-ctx.Done():
		// The batch may still commit; a retry with the same
		// Idempotency-Key finds the order.
		return written{}, ctx.Err()
	}
}

// write commits one batch and answers every order in it.
func (w *writer) write(batch []*pending) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	results := make([]written, len(batch))
	if err := pgx.BeginFunc(ctx, w.pool, func(tx pgx.Tx) error { return w.insert(ctx, tx, batch, results) }); err != nil {
		for i := range results {
			if results[i].err == nil {
				results[i] = written{err: fmt.Errorf("writing %d orders: %w", len(batch), err)}
			}
		}
	} else if w.committed != nil {
		w.committed() // wake the relay before answering: the events are the hot path
	}
	for i, p := range batch {
		p.done <- results[i]
	}
}

// insert writes a batch in a fixed number of statements. Requests that fail
// on their own (unknown product, reused key) get their error in results and
// leave the rest of the batch alone.
func (w *writer) insert(ctx context.Context, tx pgx.Tx, batch []*pending, results []written) error {
	var products []string
	for _, p := range batch {
		for _, it := range p.req.Items {
			products = append(products, it.ProductID)
		}
	}
	slices.Sort(products)
	prices, err := readPrices(ctx, tx, slices.Compact(products))
	if err != nil {
		return err
	}
	var live []int // indexes of requests still to insert
	for i, p := range batch {
		items, amount, err := priceItems(p.req.Items, prices)
		if err != nil {
			results[i].err = err
			continue
		}
		id, err := uuid.NewV7()
		if err != nil {
			return fmt.Errorf("new order id: %w", err)
		}
		results[i].order = Order{OrderID: id, UserID: p.req.UserID, Status: event.StatusCreated, AmountCents: amount, Items: items}
		live = append(live, i)
	}
	if len(live) == 0 {
		return nil
	}
	n := len(live)
	ids, users, keys, hashes, amounts := make([]uuid.UUID, n), make([]string, n), make([]string, n), make([][]byte, n), make([]int64, n)
	for j, i := range live {
		o := results[i].order
		ids[j], users[j], keys[j], hashes[j], amounts[j] = o.OrderID, o.UserID, batch[i].key, batch[i].hash, o.AmountCents
	}
	rows, err := tx.Query(ctx, `
		INSERT INTO orders (id, user_id, status, amount_cents, idempotency_key, request_hash)
		SELECT i, u, 'CREATED', a, NULLIF(k, ''), h FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::bytea[]) AS t(i, u, a, k, h)
		ON CONFLICT (user_id, idempotency_key) DO NOTHING
		RETURNING id, created_at`, ids, users, amounts, keys, hashes)
	if err != nil {
		return fmt.Errorf("inserting %d orders: %w", n, err)
	}
	created := map[uuid.UUID]time.Time{}
	var id uuid.UUID
	var at time.Time
	if _, err := pgx.ForEachRow(rows, []any{&id, &at}, func() error { created[id] = at; return nil }); err != nil {
		return fmt.Errorf("inserting %d orders: %w", n, err)
	}
	var inserted, conflicted []int
	for _, i := range live {
		if at, ok := created[results[i].order.OrderID]; ok {
			results[i].order.CreatedAt = at
			inserted = append(inserted, i)
		} else {
			conflicted = append(conflicted, i)
		}
	}
	if err := w.resolveKeys(ctx, tx, batch, results, conflicted); err != nil {
		return err
	}
	if len(inserted) == 0 {
		return nil
	}
	var itemOrders []uuid.UUID
	var itemProducts []string
	var itemQtys []int32
	var itemPrices []int64
	evs := make([]event.Event, 0, len(inserted))
	for _, i := range inserted {
		o := results[i].order
		for _, it := range o.Items {
			itemOrders, itemProducts = append(itemOrders, o.OrderID), append(itemProducts, it.ProductID)
			itemQtys, itemPrices = append(itemQtys, int32(it.Qty)), append(itemPrices, it.PriceCents)
		}
		ev, err := event.New(event.OrderCreated, o.OrderID, Name, event.Created{UserID: o.UserID, Items: batch[i].req.Items, AmountCents: o.AmountCents})
		if err != nil {
			return err
		}
		ev.Trace = batch[i].trace
		evs = append(evs, ev)
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO order_items (order_id, product_id, qty, price_cents)
		SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[])`, itemOrders, itemProducts, itemQtys, itemPrices); err != nil {
		return fmt.Errorf("inserting order items: %w", err)
	}
	return event.Emit(ctx, tx, w.topic, evs...)
}

// resolveKeys answers the requests whose Idempotency-Key already had an
// order (committed earlier, or inserted earlier in this batch): the same
// order for the same body, an error for another body.
func (w *writer) resolveKeys(ctx context.Context, tx pgx.Tx, batch []*pending, results []written, conflicted []int) error {
	if len(conflicted) == 0 {
		return nil
	}
	users, keys := make([]string, len(conflicted)), make([]string, len(conflicted))
	for j, i := range conflicted {
		users[j], keys[j] = batch[i].req.UserID, batch[i].key
	}
	rows, err := tx.Query(ctx, `
		SELECT o.user_id, o.idempotency_key, o.id, o.request_hash
		FROM orders o JOIN unnest($1::text[], $2::text[]) AS k(u, k) ON o.user_id = k.u AND o.idempotency_key = k.k`, users, keys)
	if err != nil {
		return fmt.Errorf("reading orders for idempotency keys: %w", err)
	}
	type prev struct {
		id   uuid.UUID
		hash []byte
	}
	found := map[[2]string]prev{}
	var u, k string
	var p prev
	if _, err := pgx.ForEachRow(rows, []any{&u, &k, &p.id, &p.hash}, func() error { found[[2]string{u, k}] = p; return nil }); err != nil {
		return fmt.Errorf("reading orders for idempotency keys: %w", err)
	}
	for _, i := range conflicted {
		p, ok := found[[2]string{batch[i].req.UserID, batch[i].key}]
		switch {
		case !ok:
			return fmt.Errorf("order for idempotency key %q vanished", batch[i].key)
		case !bytes.Equal(p.hash, batch[i].hash):
			results[i] = written{err: errKeyReused}
		default:
			results[i] = written{order: Order{OrderID: p.id}, replayed: true}
		}
	}
	return nil
}

func readPrices(ctx context.Context, tx pgx.Tx, ids []string) (map[string]int64, error) {
	rows, err := tx.Query(ctx, `SELECT id, price_cents FROM products WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("reading prices: %w", err)
	}
	prices := make(map[string]int64, len(ids))
	var id string
	var p int64
	if _, err := pgx.ForEachRow(rows, []any{&id, &p}, func() error { prices[id] = p; return nil }); err != nil {
		return nil, fmt.Errorf("reading prices: %w", err)
	}
	return prices, nil
}

// priceItems prices an order's lines. An unknown product is the client's
// mistake (422), found before anything is written.
func priceItems(req []event.Item, prices map[string]int64) ([]OrderItem, int64, error) {
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

var errKeyReused = &Error{Status: http.StatusUnprocessableEntity, Code: "idempotency_key_reused",
	Message: "this Idempotency-Key was used with a different request body"}
