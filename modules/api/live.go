package api

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/labstack/echo/v4"

	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
)

// The live saga page: GET /live serves the page (embedded, no build step),
// GET /live/stream streams Server-Sent Events to it. The api does not
// consume the topic through a consumer group for this: the process wiring
// tails the topic (every api process sees every event) and hands each event
// to Publish. Each stream sees only the orders its API key may read; dead
// letters only admin keys.

//go:embed web/live.html
var webFS embed.FS

var livePage = template.Must(template.ParseFS(webFS, "web/live.html"))

// LiveOrder is an order in a stream's first snapshot.
type LiveOrder struct {
	OrderID   uuid.UUID    `json:"order_id"`
	Status    event.Status `json:"status"`
	UpdatedAt time.Time    `json:"updated_at"`
}

// LiveSnapshot is the first message of a stream.
type LiveSnapshot struct {
	Orders []LiveOrder `json:"orders"`
	Admin  bool        `json:"admin"`
	// Parked are the outbox records the broker refused for good (admins
	// only): they never reach the topic, so no stream message shows them.
	Parked []LiveParked `json:"parked,omitempty"`
	// DeadLetters are the latest dead letters not re-driven yet (admins
	// only), each with the id the page's re-drive button posts.
	DeadLetters []deadletter.Entry `json:"dead_letters,omitempty"`
	// PaidOverdue counts the paid orders older than the saga deadline that
	// have not shipped (admins only; -1 when not counted).
	PaidOverdue int64 `json:"paid_overdue,omitempty"`
}

// LiveParked is an outbox record the relay parked.
type LiveParked struct {
	OutboxID int64     `json:"outbox_id"`
	Topic    string    `json:"topic"`
	Error    string    `json:"error"`
	Time     time.Time `json:"time"`
}

// LiveEvent is one saga event on a stream, with the status it leads to.
// Status is left out for an event that moves no status (OrderExpired,
// OrderCancelRequested, ShipmentCancelled) rather than sent as "": a
// client generated from the document then has an optional status enum,
// not one with a blank member it must treat as "no change".
type LiveEvent struct {
	EventID uuid.UUID    `json:"event_id"`
	OrderID uuid.UUID    `json:"order_id"`
	Type    event.Type   `json:"type"`
	Source  string       `json:"source"`
	Time    time.Time    `json:"time"`
	Status  event.Status `json:"status,omitempty"`
}

// LiveDeadLetter is one dead-lettered record on an admin's stream.
type LiveDeadLetter struct {
	ID          int64     `json:"id,omitempty"` // for the re-drive button; 0 for dead letters written before ids
	Partition   int32     `json:"partition"`
	Offset      int64     `json:"offset"`
	Participant string    `json:"participant"`
	Reason      string    `json:"reason"`
	Type        string    `json:"type,omitempty"`
	OrderID     string    `json:"order_id,omitempty"`
	Time        time.Time `json:"time"`
}

// hub fans events out to the open streams.
type hub struct {
	mu     sync.Mutex
	subs   map[*stream]struct{}
	owners map[uuid.UUID]string // order -> user, for filtering
}

// maxOwners bounds the owner cache; past it the cache starts over and
// owners are read from PostgreSQL again.
const maxOwners = 100_000

// streamBuffer is how many messages a stream may fall behind before it is
// cut off (the page reconnects to a fresh snapshot).
const streamBuffer = 1024

type stream struct {
	p    Principal
	ch   chan sseMessage
	gone chan struct{} // closed when the hub drops a slow stream
}

type sseMessage struct {
	name string
	data []byte
}

func newHub() *hub {
	return &hub{subs: map[*stream]struct{}{}, owners: map[uuid.UUID]string{}}
}

func (h *hub) add(p Principal) *stream {
	s := &stream{p: p, ch: make(chan sseMessage, streamBuffer), gone: make(chan struct{})}
	h.mu.Lock()
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	return s
}

func (h *hub) remove(s *stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.subs[s]; ok {
		delete(h.subs, s)
		close(s.gone)
	}
}

// send offers m to every stream allowed to see it, dropping a stream whose
// buffer is full rather than slowing the tail down.
func (h *hub) send(m sseMessage, allowed func(Principal) bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		if !allowed(s.p) {
			continue
		}
		select {
		case s.ch <- m:
		default:
			delete(h.subs, s)
			close(s.gone)
		}
	}
}

// endKey ends every stream of key id and says how many there were.
func (h *hub) endKey(id string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for s := range h.subs {
		if s.p.KeyID == id {
			delete(h.subs, s)
			close(s.gone)
			n++
		}
	}
	return n
}

// keyIDs lists the keys of the open streams.
func (h *hub) keyIDs() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	seen := map[string]bool{}
	var ids []string
	for s := range h.subs {
		if id := s.p.KeyID; id != "" && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	return ids
}

func (h *hub) watched() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs) > 0
}

// Watched reports whether any live stream is open; with none, the feed
// need not even decode what it reads.
func (a *API) Watched() bool { return a.live.watched() }

// Publish hands a saga event from the topic to the open streams.
func (a *API) Publish(ctx context.Context, ev event.Event) {
	if !a.live.watched() {
		return
	}
	owner := a.owner(ctx, ev)
	b, err := json.Marshal(LiveEvent{EventID: ev.ID, OrderID: ev.OrderID, Type: ev.Type, Source: ev.Source, Time: ev.Time, Status: ev.Type.OrderStatus()})
	if err != nil {
		return
	}
	a.live.send(sseMessage{name: "order", data: b}, func(p Principal) bool { return owner != "" && canRead(p, owner) })
}

// PublishDeadLetter hands a dead-lettered record to admins' streams.
func (a *API) PublishDeadLetter(d LiveDeadLetter) {
	b, err := json.Marshal(d)
	if err != nil {
		return
	}
	a.live.send(sseMessage{name: "dead_letter", data: b}, func(p Principal) bool { return p.Admin })
}

// owner returns the user whose order ev is about: from OrderCreated's
// payload, remembered while any stream is open, else from PostgreSQL (""
// if unknown).
func (a *API) owner(ctx context.Context, ev event.Event) string {
	h := a.live
	if ev.Type == event.OrderCreated {
		var c event.Created
		if ev.Decode(&c) == nil {
			h.mu.Lock()
			if len(h.owners) >= maxOwners {
				h.owners = map[uuid.UUID]string{}
			}
			h.owners[ev.OrderID] = c.UserID
			h.mu.Unlock()
			return c.UserID
		}
	}
	h.mu.Lock()
	u, ok := h.owners[ev.OrderID]
	h.mu.Unlock()
	if ok {
		return u
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := a.pool.QueryRow(ctx, `SELECT user_id FROM orders WHERE id = $1`, ev.OrderID).Scan(&u); err != nil {
		if !errors.Is(err, pgx.ErrNoRows) {
			a.log.WarnContext(ctx, "live page: reading order owner", "order_id", ev.OrderID, "err", err)
		}
		return ""
	}
	h.mu.Lock()
	h.owners[ev.OrderID] = u
	h.mu.Unlock()
	return u
}

// livePageData is what the page template is given: the demo key, when it
// is active, so the README's walkthrough works without pasting one, and
// whether keys are needed at all.
type livePageData struct {
	DemoKey string
	AuthOff bool
}

func (a *API) livePage(c echo.Context) error {
	c.Response().Header().Set("Content-Type", "text/html; charset=utf-8")
	c.Response().Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'")
	c.Response().WriteHeader(http.StatusOK)
	return livePage.Execute(c.Response(), livePageData{DemoKey: a.demoKey, AuthOff: a.auth.Disabled})
}

// liveStream serves one page's Server-Sent Events: a snapshot of the
// latest orders the key may read, then their events as they happen.
func (a *API) liveStream(c echo.Context) error {
	p := principal(c)
	s := a.live.add(p) // before the snapshot, so nothing falls between
	defer a.live.remove(s)
	sctx, cancel := context.WithTimeout(c.Request().Context(), dbTimeout)
	snap, err := a.snapshot(sctx, p)
	cancel()
	if err != nil {
		return err // a timeout is 503 (streamBound)
	}
	w := c.Response()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w.Writer)
	// A stream outlives the server's read and write timeouts (a read
	// deadline passing would cancel the request's context).
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	b, _ := json.Marshal(snap) // cannot fail: plain values
	if writeSSE(w, sseMessage{name: "snapshot", data: b}) != nil || rc.Flush() != nil {
		return nil
	}
	keepAlive := time.NewTicker(15 * time.Second)
	defer keepAlive.Stop()
	for {
		select {
		case <-c.Request().Context().Done():
			return nil
		case <-s.gone:
			return nil // fell behind (the page reconnects), or its key was revoked
		case <-a.stop:
			return nil
		case m := <-s.ch:
			// Write what else is waiting too, then flush once: one write
			// per burst, not per event, keeps a stream up with the saga.
			err := writeSSE(w, m)
			for n := 0; err == nil && n < streamBuffer && len(s.ch) > 0; n++ {
				err = writeSSE(w, <-s.ch)
			}
			if err != nil || rc.Flush() != nil {
				return nil
			}
		case <-keepAlive.C:
			if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil || rc.Flush() != nil {
				return nil
			}
		}
	}
}

func writeSSE(w http.ResponseWriter, m sseMessage) error {
	_, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", m.name, m.data)
	return err
}

// snapshotOrders is how many of the latest orders a stream starts with.
const snapshotOrders = 50

func (a *API) snapshot(ctx context.Context, p Principal) (LiveSnapshot, error) {
	// Order ids are UUIDv7: id order is creation order, and both queries
	// read an index backwards.
	q := `SELECT id, status, updated_at FROM orders WHERE user_id = $1 ORDER BY id DESC LIMIT $2`
	args := []any{p.UserID, snapshotOrders}
	if p.Admin {
		q = `SELECT id, status, updated_at FROM orders ORDER BY id DESC LIMIT $1`
		args = args[1:]
	}
	rows, err := a.pool.Query(ctx, q, args...)
	if err != nil {
		return LiveSnapshot{}, fmt.Errorf("reading latest orders: %w", err)
	}
	orders, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (LiveOrder, error) {
		var o LiveOrder
		err := r.Scan(&o.OrderID, &o.Status, &o.UpdatedAt)
		return o, err
	})
	if err != nil {
		return LiveSnapshot{}, fmt.Errorf("reading latest orders: %w", err)
	}
	if orders == nil {
		orders = []LiveOrder{}
	}
	snap := LiveSnapshot{Orders: orders, Admin: p.Admin}
	if p.Admin {
		rows, err := a.pool.Query(ctx, `SELECT id, topic, error, parked_at FROM parked ORDER BY id DESC LIMIT 30`)
		if err != nil {
			return LiveSnapshot{}, fmt.Errorf("reading parked records: %w", err)
		}
		if snap.Parked, err = pgx.CollectRows(rows, pgx.RowToStructByPos[LiveParked]); err != nil {
			return LiveSnapshot{}, fmt.Errorf("reading parked records: %w", err)
		}
		if snap.DeadLetters, err = deadletter.Open(ctx, a.pool, 30); err != nil {
			return LiveSnapshot{}, err
		}
		snap.PaidOverdue = -1
		if a.sagaDeadline > 0 {
			if snap.PaidOverdue, err = deadletter.PaidOverdue(ctx, a.pool, a.sagaDeadline); err != nil {
				return LiveSnapshot{}, err
			}
		}
	}
	return snap, nil
}
