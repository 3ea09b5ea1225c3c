// Package check verifies the saga's invariants against the record, the way
// Jepsen's checkers do: it reads PostgreSQL (and the Redis status cache and
// the dead-letter topic), and reports every order or product that breaks a
// rule. It is safe on a live system: rules that in-flight work may break
// for a moment only apply to orders older than a deadline.
package check

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"
	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
)

// Config says what to check and where.
type Config struct {
	Deadline time.Duration // orders older than this must be done
	// SagaDeadline is --saga-deadline: paid orders older than it that have
	// not shipped are counted apart (the expiry never cancels them).
	SagaDeadline time.Duration
	Redis        rueidis.Client
	Prefix       string    // Redis key prefix (--redis-prefix; the deployment id is added)
	Kafka        saga.Conn // for the dead-letter count; no brokers skips it
	DLQTopic     string
	// Since bounds the orders checked to those created at or after it
	// (zero: every order). The rules that read order_events, payments and
	// reservations per order then join only the window's orders, found
	// through the primary key (order ids are UUIDv7, so time-ordered), not
	// all of a large database's history. Stock conservation is a sum over
	// every order and is always checked whole.
	Since time.Time
}

// Violation is one broken rule.
type Violation struct {
	Rule    string `json:"rule"`
	Subject string `json:"subject"` // an order or product id
	Message string `json:"message"`
}

// Report is the outcome of a check.
type Report struct {
	Orders           int64          `json:"orders"`
	Terminal         int64          `json:"terminal"`
	OutboxRows       int64          `json:"outbox_rows"`
	OutboxOldest     time.Duration  `json:"outbox_oldest_ns"`
	DeadLetters      int64          `json:"dead_letters"` // -1 when not counted
	PaidOverdue      int64          `json:"paid_overdue"` // paid, not shipped, older than the saga deadline
	CacheEntries     int64          `json:"cache_entries"`
	Since            *time.Time     `json:"since,omitempty"` // the window's start, when bounded
	Rules            []string       `json:"rules"`
	Violations       []Violation    `json:"violations"`
	ViolationsByRule map[string]int `json:"violations_by_rule"`
}

// The rules, in the order they are checked and reported.
const (
	RuleStuck    = "stuck sagas"
	RuleStock    = "stock conservation"
	RuleOnce     = "effects at most once"
	RuleShipped  = "shipped only when paid"
	RuleReleased = "declined orders released once"
	RuleRefund   = "refunds only for cancelled, unshipped orders"
	RuleTrail    = "audit trail is a lifecycle path"
	RuleCache    = "status cache agrees"
	RuleOutbox   = "outbox drains"
	maxPerRule   = 50 // violations listed per rule; the count says the rest
)

// Run checks every rule.
func Run(ctx context.Context, pool *pgxpool.Pool, cfg Config) (*Report, error) {
	r := &Report{ViolationsByRule: map[string]int{}, DeadLetters: -1}
	if !cfg.Since.IsZero() {
		r.Since = &cfg.Since
	}
	w := newWindow(cfg.Since)
	if err := pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE status IN ('SHIPPED', 'CANCELLED')) FROM orders o WHERE `+w.where,
		w.args...).Scan(&r.Orders, &r.Terminal); err != nil {
		return nil, fmt.Errorf("counting orders: %w", err)
	}
	if cfg.SagaDeadline > 0 {
		var err error
		if r.PaidOverdue, err = deadletter.PaidOverdue(ctx, pool, cfg.SagaDeadline); err != nil {
			return nil, err
		}
	}
	secs := cfg.Deadline.Seconds()
	steps := []struct {
		rule string
		fn   func() error
	}{
		{RuleStuck, func() error { return r.stuck(ctx, pool, w, secs, cfg.SagaDeadline) }},
		{RuleStock, func() error { return r.stock(ctx, pool) }},
		{RuleOnce, func() error { return r.once(ctx, pool, w) }},
		{RuleShipped, func() error { return r.shipped(ctx, pool, w) }},
		{RuleReleased, func() error { return r.released(ctx, pool, w, secs) }},
		{RuleRefund, func() error { return r.refunds(ctx, pool, w, secs) }},
		{RuleTrail, func() error { return r.trail(ctx, pool, w) }},
		{RuleCache, func() error { return r.cache(ctx, pool, cfg) }},
		{RuleOutbox, func() error { return r.outbox(ctx, pool, cfg.Deadline) }},
	}
	for _, s := range steps {
		r.Rules = append(r.Rules, s.rule)
		if err := s.fn(); err != nil {
			return nil, fmt.Errorf("checking %s: %w", s.rule, err)
		}
	}
	if len(cfg.Kafka.Brokers) > 0 {
		n, err := countTopic(ctx, cfg.Kafka, cfg.DLQTopic)
		if err != nil {
			return nil, err
		}
		r.DeadLetters = n
	}
	return r, nil
}

// window is the orders a check reads, as SQL over orders o: its where
// clause takes the first two parameters, and a rule's own come after.
type window struct {
	where string
	args  []any
}

// newWindow bounds the orders to those created at or after since (zero:
// every order). The first condition is the primary key's range: an order id
// is a UUIDv7 whose first 48 bits are its creation's Unix milliseconds, so
// the lowest id of since's millisecond (the rest zero) is below every later
// one, and PostgreSQL reads the window from the index instead of the table.
// The second keeps the truth of created_at for ids made otherwise (by hand:
// an order with a random UUIDv4 id in the window may be missed).
func newWindow(since time.Time) window {
	var lo uuid.UUID // zero: below every id
	if !since.IsZero() {
		ms := since.UnixMilli()
		for i := range 6 {
			lo[i] = byte(ms >> (8 * (5 - i)))
		}
	}
	return window{where: "o.id >= $1 AND o.created_at >= $2", args: []any{lo, since}}
}

// with returns the window's arguments followed by a rule's own ($3 on).
func (w window) with(args ...any) []any { return append(slices.Clone(w.args), args...) }

func (r *Report) add(rule, subject, format string, args ...any) {
	r.ViolationsByRule[rule]++
	if r.ViolationsByRule[rule] <= maxPerRule {
		r.Violations = append(r.Violations, Violation{Rule: rule, Subject: subject, Message: fmt.Sprintf(format, args...)})
	}
}

// each runs sql and calls fn with every row's values.
func each(ctx context.Context, pool *pgxpool.Pool, sql string, args []any, fn func(vals []any)) error {
	rows, err := pool.Query(ctx, sql, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			return err
		}
		fn(vals)
	}
	return rows.Err()
}

func str(v any) string {
	switch x := v.(type) {
	case [16]byte:
		return uuid.UUID(x).String()
	case nil:
		return "none"
	}
	return fmt.Sprint(v)
}

// stuck: the choreography's stuck-saga detector.
func (r *Report) stuck(ctx context.Context, pool *pgxpool.Pool, w window, secs float64, sagaDeadline time.Duration) error {
	return each(ctx, pool, `
		SELECT o.id, o.status, round(extract(epoch FROM now() - o.created_at))::bigint,
		       (SELECT e.type FROM order_events e WHERE e.order_id = o.id ORDER BY e.seq DESC LIMIT 1)
		FROM orders o
		WHERE `+w.where+` AND o.status NOT IN ('SHIPPED', 'CANCELLED') AND o.created_at < now() - make_interval(secs => $3)
		ORDER BY o.created_at`, w.with(secs), func(v []any) {
		note := ""
		if age, _ := v[2].(int64); v[1] == string(event.StatusPaid) && sagaDeadline > 0 && float64(age) > sagaDeadline.Seconds() {
			note = " (paid, past the saga deadline: never cancelled; ship or refund it)"
		}
		r.add(RuleStuck, str(v[0]), "still %s after %ss; last event %s%s", v[1], str(v[2]), str(v[3]), note)
	})
}

// stock: received = stock + units held by reservations not released. A
// sum over every order, so never windowed; each sum is one pass over its
// table grouped by product (neither reservations nor order_items has an
// index by product: a sum per product would read them once per product).
func (r *Report) stock(ctx context.Context, pool *pgxpool.Pool) error {
	return each(ctx, pool, `
		WITH held AS (
		    SELECT product_id, sum(qty) AS units FROM reservations WHERE released_at IS NULL GROUP BY product_id
		), shipped AS (
		    SELECT i.product_id, sum(i.qty) AS units FROM order_items i JOIN orders o ON o.id = i.order_id
		    WHERE o.status = 'SHIPPED' GROUP BY i.product_id
		)
		SELECT p.id, p.received, p.stock, coalesce(h.units, 0), coalesce(s.units, 0)
		FROM products p LEFT JOIN held h ON h.product_id = p.id LEFT JOIN shipped s ON s.product_id = p.id
		ORDER BY p.id`, nil, func(v []any) {
		received, stock, held, shipped := v[1].(int64), v[2].(int64), v[3].(int64), v[4].(int64)
		if received != stock+held {
			r.add(RuleStock, str(v[0]), "received %d != stock %d + held by reservations %d (shipped %d, in flight %d): %+d units",
				received, stock, held, shipped, held-shipped, stock+held-received)
		}
		if shipped > held {
			r.add(RuleStock, str(v[0]), "%d units shipped but only %d held by reservations", shipped, held)
		}
	})
}

// once: no order has two decisions of one kind in its audit trail.
func (r *Report) once(ctx context.Context, pool *pgxpool.Pool, w window) error {
	return each(ctx, pool, `
		SELECT e.order_id, e.type, count(*) FROM orders o JOIN order_events e ON e.order_id = o.id
		WHERE `+w.where+` AND e.type <> $3
		GROUP BY e.order_id, e.type HAVING count(*) > 1 ORDER BY e.order_id`, w.with(deadletter.TrailType), func(v []any) {
		r.add(RuleOnce, str(v[0]), "%s recorded %s times", v[1], str(v[2]))
	})
}

// shipped: nothing SHIPPED without a completed payment and one shipment.
func (r *Report) shipped(ctx context.Context, pool *pgxpool.Pool, w window) error {
	return each(ctx, pool, `
		SELECT o.id, o.status, coalesce(p.status, 'no payment'), (s.order_id IS NOT NULL)
		FROM orders o
		LEFT JOIN payments p ON p.order_id = o.id
		LEFT JOIN shipments s ON s.order_id = o.id
		WHERE `+w.where+` AND ((o.status = 'SHIPPED' AND (p.status IS DISTINCT FROM 'COMPLETED' OR s.order_id IS NULL))
		   OR (s.order_id IS NOT NULL AND p.status IS DISTINCT FROM 'COMPLETED'))
		ORDER BY o.id`, w.args, func(v []any) {
		r.add(RuleShipped, str(v[0]), "status %s, payment %s, shipment %v", v[1], v[2], v[3])
	})
}

// released: every declined or refunded order's stock given back (once the
// deadline has passed), and never a release for an order that was neither.
func (r *Report) released(ctx context.Context, pool *pgxpool.Pool, w window, secs float64) error {
	err := each(ctx, pool, `
		SELECT p.order_id, count(r.*) FILTER (WHERE r.released_at IS NULL), p.status
		FROM orders o JOIN payments p ON p.order_id = o.id JOIN reservations r ON r.order_id = o.id
		LEFT JOIN refunds f ON f.order_id = o.id
		WHERE `+w.where+` AND ((p.status = 'DECLINED' AND p.created_at < now() - make_interval(secs => $3))
		   OR f.created_at < now() - make_interval(secs => $3))
		GROUP BY p.order_id, p.status HAVING count(r.*) FILTER (WHERE r.released_at IS NULL) > 0`, w.with(secs), func(v []any) {
		what := "declined"
		if v[2] != "DECLINED" {
			what = "refunded"
		}
		r.add(RuleReleased, str(v[0]), "%s, but %s reservation lines still held", what, str(v[1]))
	})
	if err != nil {
		return err
	}
	return each(ctx, pool, `
		SELECT r.order_id, coalesce(p.status, 'no payment')
		FROM orders o JOIN reservations r ON r.order_id = o.id LEFT JOIN payments p ON p.order_id = o.id
		WHERE `+w.where+` AND r.released_at IS NOT NULL AND p.status IS DISTINCT FROM 'DECLINED'
		  AND NOT EXISTS (SELECT 1 FROM refunds f WHERE f.order_id = r.order_id)
		GROUP BY r.order_id, p.status`, w.args, func(v []any) {
		r.add(RuleReleased, str(v[0]), "stock released but payment is %s and nothing was refunded", v[1])
	})
}

// refunds: a refund gives back the order's own completed payment, for an
// order someone asked to cancel, that delivery withheld and did not ship,
// and that ends CANCELLED; a cancel request and a shipment never meet; a
// withheld order is refunded (once the deadline has passed).
func (r *Report) refunds(ctx context.Context, pool *pgxpool.Pool, w window, secs float64) error {
	return each(ctx, pool, `
		SELECT o.id,
		       CASE
		         WHEN s.order_id IS NOT NULL AND w.order_id IS NOT NULL THEN 'both shipped and withheld'
		         WHEN s.order_id IS NOT NULL AND o.cancel_requested_at IS NOT NULL THEN 'shipped although its cancel was recorded'
		         WHEN f.order_id IS NOT NULL AND s.order_id IS NOT NULL THEN 'refunded and shipped'
		         WHEN f.order_id IS NOT NULL AND (p.status IS DISTINCT FROM 'COMPLETED' OR p.id <> f.payment_id OR p.amount_cents <> f.amount_cents)
		           THEN 'refund does not match a completed payment of the order (payment ' || coalesce(p.status, 'none') || ')'
		         WHEN f.order_id IS NOT NULL AND o.cancel_requested_at IS NULL THEN 'refunded without a cancel request'
		         WHEN f.order_id IS NOT NULL AND w.order_id IS NULL THEN 'refunded without delivery withholding it'
		         WHEN f.order_id IS NOT NULL AND o.status <> 'CANCELLED' AND f.created_at < now() - make_interval(secs => $3)
		           THEN 'refunded but ' || o.status
		         WHEN w.order_id IS NOT NULL AND f.order_id IS NULL AND w.withheld_at < now() - make_interval(secs => $3)
		           THEN 'withheld from shipping but never refunded'
		       END
		FROM (
		  -- the window's orders a cancel touched: asked for, withheld or
		  -- refunded (a small set, found without reading the others)
		  SELECT * FROM orders o WHERE `+w.where+` AND o.cancel_requested_at IS NOT NULL
		  UNION SELECT o.* FROM orders o JOIN withheld_shipments w ON w.order_id = o.id WHERE `+w.where+`
		  UNION SELECT o.* FROM orders o JOIN refunds f ON f.order_id = o.id WHERE `+w.where+`
		) o
		LEFT JOIN payments p ON p.order_id = o.id
		LEFT JOIN shipments s ON s.order_id = o.id
		LEFT JOIN withheld_shipments w ON w.order_id = o.id
		LEFT JOIN refunds f ON f.order_id = o.id
		ORDER BY o.id`, w.with(secs), func(v []any) {
		if v[1] != nil {
			r.add(RuleRefund, str(v[0]), "%s", v[1])
		}
	})
}

// paths are the lifecycle's valid audit trails; a trail must be a prefix
// of one of them.
var paths = [][]event.Type{
	{event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.OrderShipped},
	{event.OrderCreated, event.InventoryReserved, event.PaymentFailed, event.InventoryReleased},
	{event.OrderCreated, event.InventoryFailed},
}

// expiredPaths are the further paths of an order that got an OrderExpired
// (left out of the trail before matching, wherever it fell): payment's
// PaymentFailed may come before inventory has reserved (nothing held, or a
// late reservation that the release then gives back) or before a late
// OrderCreated is refused; a paid order goes on to ship.
var expiredPaths = [][]event.Type{
	{event.OrderCreated, event.PaymentFailed, event.InventoryReserved, event.InventoryReleased},
	{event.OrderCreated, event.PaymentFailed, event.InventoryFailed},
	{event.OrderCreated, event.InventoryFailed, event.PaymentFailed},
}

// cancelPaths are the further path of an order with an
// OrderCancelRequested (left out like an expiry): one cancelled before its
// charge takes the expiry's paths; one cancelled after it and before its
// shipment is withheld by delivery, refunded by payment and released.
var cancelPaths = [][]event.Type{
	{event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.ShipmentCancelled, event.PaymentRefunded, event.InventoryReleased},
}

// ValidTrail reports whether a trail is a prefix of a lifecycle path.
// Re-drive entries (deadletter.TrailType) are no saga events and are left
// out; an OrderExpired, at most one, allows the expiry's paths too; an
// OrderCancelRequested, at most one, allows those and the refund's path.
func ValidTrail(trail []event.Type) bool {
	expired, cancelled := 0, 0
	saga := make([]event.Type, 0, len(trail))
	for _, t := range trail {
		switch t {
		case event.OrderExpired:
			expired++
		case event.OrderCancelRequested:
			cancelled++
		case deadletter.TrailType:
		default:
			saga = append(saga, t)
		}
	}
	if expired > 1 || cancelled > 1 {
		return false
	}
	candidates := paths
	if expired+cancelled > 0 {
		candidates = append(slices.Clip(paths), expiredPaths...)
	}
	if cancelled == 1 {
		candidates = append(candidates, cancelPaths...)
	}
	for _, p := range candidates {
		if len(saga) <= len(p) && slices.Equal(saga, p[:len(saga)]) {
			return true
		}
	}
	return false
}

// trail: each order's audit trail is a lifecycle path and its status is
// where that path leads.
func (r *Report) trail(ctx context.Context, pool *pgxpool.Pool, w window) error {
	var cur uuid.UUID
	var status string
	var trail []event.Type
	flush := func() {
		if len(trail) == 0 {
			return
		}
		names := make([]string, len(trail))
		for i, t := range trail {
			names[i] = string(t)
		}
		if !ValidTrail(trail) {
			r.add(RuleTrail, cur.String(), "trail %s is not a lifecycle path", strings.Join(names, " -> "))
			return
		}
		want := event.StatusCreated
		for _, t := range trail {
			if s, ok := event.StatusAfter(t); ok && s.Rank() > want.Rank() {
				want = s
			}
		}
		if string(want) != status {
			r.add(RuleTrail, cur.String(), "status %s but the trail %s leads to %s", status, strings.Join(names, " -> "), want)
		}
	}
	err := each(ctx, pool, `
		SELECT e.order_id, e.type, o.status FROM order_events e JOIN orders o ON o.id = e.order_id
		WHERE `+w.where+`
		ORDER BY e.order_id, e.seq`, w.args, func(v []any) {
		id := uuid.UUID(v[0].([16]byte))
		if id != cur {
			flush()
			cur, trail = id, nil
		}
		trail = append(trail, event.Type(v[1].(string)))
		status = v[2].(string)
	})
	flush()
	return err
}

// cache: a cached status is never ahead of PostgreSQL, and not behind it
// for longer than a cache entry can live.
func (r *Report) cache(ctx context.Context, pool *pgxpool.Pool, cfg Config) error {
	if cfg.Redis == nil {
		return nil
	}
	prefix, err := statuscache.BoundPrefix(ctx, pool, cfg.Prefix)
	if err != nil {
		return err
	}
	cache := statuscache.New(cfg.Redis, prefix)
	var cursor uint64
	var ids []uuid.UUID
	for {
		e, err := cfg.Redis.Do(ctx, cfg.Redis.B().Scan().Cursor(cursor).Match(prefix+"order:*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			return fmt.Errorf("scanning the status cache: %w", err)
		}
		for _, k := range e.Elements {
			if id, err := uuid.Parse(strings.TrimPrefix(k, prefix+"order:")); err == nil {
				ids = append(ids, id)
			}
		}
		if cursor = e.Cursor; cursor == 0 {
			break
		}
	}
	r.CacheEntries = int64(len(ids))
	for chunk := range slices.Chunk(ids, 1000) {
		// The cache first, PostgreSQL second: the status writer commits
		// before it writes the cache, so a live system can only look
		// behind in this order, never ahead.
		cached := map[uuid.UUID]statuscache.Entry{}
		for _, id := range chunk {
			e, ok, err := cache.Get(ctx, id)
			if err != nil {
				return err
			}
			if ok {
				cached[id] = e
			}
		}
		db := map[uuid.UUID][2]any{}
		err := each(ctx, pool, `SELECT id, status, extract(epoch FROM now() - updated_at)::float8 FROM orders WHERE id = ANY($1)`,
			[]any{chunk}, func(v []any) { db[uuid.UUID(v[0].([16]byte))] = [2]any{v[1], v[2]} })
		if err != nil {
			return err
		}
		for _, id := range chunk {
			e, ok := cached[id]
			if !ok {
				continue // expired since the scan
			}
			row, found := db[id]
			if !found {
				r.add(RuleCache, id.String(), "cached as %s but no such order in PostgreSQL", e.Status)
				continue
			}
			truth, age := event.Status(row[0].(string)), row[1].(float64)
			switch {
			case e.Status.Rank() > truth.Rank():
				r.add(RuleCache, id.String(), "cache says %s, ahead of PostgreSQL's %s", e.Status, truth)
			case e.Status != truth && age > 90:
				r.add(RuleCache, id.String(), "cache says %s, PostgreSQL %s since %.0fs ago", e.Status, truth, age)
			}
		}
	}
	return nil
}

// outbox: published rows leave; nothing waits longer than the deadline.
func (r *Report) outbox(ctx context.Context, pool *pgxpool.Pool, deadline time.Duration) error {
	var oldest float64
	if err := pool.QueryRow(ctx, `SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM outbox`).
		Scan(&r.OutboxRows, &oldest); err != nil {
		return err
	}
	r.OutboxOldest = time.Duration(oldest * float64(time.Second))
	if r.OutboxOldest > deadline {
		r.add(RuleOutbox, "outbox", "%d rows waiting, the oldest for %s: the relay is not publishing", r.OutboxRows, r.OutboxOldest.Round(time.Second))
	}
	return nil
}

// countTopic counts the records a topic holds.
func countTopic(ctx context.Context, conn saga.Conn, topic string) (int64, error) {
	cl, err := conn.Client()
	if err != nil {
		return 0, err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	starts, err := adm.ListStartOffsets(ctx, topic)
	if err != nil {
		return 0, fmt.Errorf("cannot reach Kafka at %v: %w", conn.Brokers, err)
	}
	ends, err := adm.ListEndOffsets(ctx, topic)
	if err != nil {
		return 0, fmt.Errorf("cannot reach Kafka at %v: %w", conn.Brokers, err)
	}
	var n int64
	ends.Each(func(o kadm.ListedOffset) {
		if s, ok := starts.Lookup(o.Topic, o.Partition); ok && o.Err == nil {
			n += o.Offset - s.Offset
		}
	})
	return n, nil
}

// Text renders a report for people.
func (r *Report) Text() string {
	var b strings.Builder
	dl := "not counted"
	if r.DeadLetters >= 0 {
		dl = strconv.FormatInt(r.DeadLetters, 10)
	}
	if r.Since != nil {
		fmt.Fprintf(&b, "orders created since %s (stock conservation: every order)\n", r.Since.UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(&b, "%d orders (%d terminal, %d in flight); outbox %d rows (oldest %s); %d cache entries; dead letters: %s\n",
		r.Orders, r.Terminal, r.Orders-r.Terminal, r.OutboxRows, r.OutboxOldest.Round(time.Millisecond), r.CacheEntries, dl)
	if r.PaidOverdue > 0 {
		fmt.Fprintf(&b, "%d paid orders past the saga deadline and not shipped: never cancelled (the money has moved); ship or refund them\n", r.PaidOverdue)
	}
	for _, rule := range r.Rules {
		n := r.ViolationsByRule[rule]
		mark := "ok  "
		if n > 0 {
			mark = "FAIL"
		}
		fmt.Fprintf(&b, "%s %-32s %d violations\n", mark, rule, n)
		for _, v := range r.Violations {
			if v.Rule == rule {
				fmt.Fprintf(&b, "       %s: %s\n", v.Subject, v.Message)
			}
		}
		if n > maxPerRule {
			fmt.Fprintf(&b, "       ... and %d more\n", n-maxPerRule)
		}
	}
	return b.String()
}
