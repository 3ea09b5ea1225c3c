package api

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/labstack/echo/v4"

	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
)

// CreateRequest is the body of POST /orders. Only these fields are accepted.
type CreateRequest struct {
	UserID string       `json:"user_id,omitempty"` // sent, it must not be empty
	Items  []event.Item `json:"items"`
}

// CreateResponse is the answer to POST /orders, the same for a replay.
type CreateResponse struct {
	OrderID uuid.UUID    `json:"order_id"`
	Status  event.Status `json:"status"`
}

// Order is the answer to GET /orders/{id}.
type Order struct {
	OrderID     uuid.UUID    `json:"order_id"`
	UserID      string       `json:"user_id"`
	Status      event.Status `json:"status"`
	AmountCents int64        `json:"amount_cents"`
	Items       []OrderItem  `json:"items"`
	CreatedAt   time.Time    `json:"created_at"`
	// DeadLetters are the order's records a participant could not
	// process, with the participant and the reason (re-driven ones keep
	// their entry, with when and by whom); Parked its events the broker
	// refused. Both absent when there are none.
	DeadLetters []deadletter.Entry  `json:"dead_letters,omitempty"`
	Parked      []deadletter.Parked `json:"parked,omitempty"`
}

// OrderItem is one line of an Order.
type OrderItem struct {
	ProductID  string `json:"product_id"`
	Qty        int    `json:"qty"`
	PriceCents int64  `json:"price_cents"`
}

// AuditEvent is one entry of GET /orders/{id}/events.
type AuditEvent struct {
	EventID uuid.UUID       `json:"event_id"`
	Type    string          `json:"type"`
	Source  string          `json:"source"`
	Time    time.Time       `json:"time"`
	Data    json.RawMessage `json:"data"`
}

// Product is one entry of GET /products.
type Product struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	PriceCents int64  `json:"price_cents"`
	Stock      int64  `json:"stock"`
}

var (
	userIDPattern = regexp.MustCompile(`^[A-Za-z0-9._@:-]{1,64}$`)
	keyPattern    = regexp.MustCompile(`^[\x21-\x7e]{1,255}$`)
	// productIDPattern is what openapi.json says a product id is:
	// printable ASCII, so its 64 characters are the event contract's 64
	// bytes and PostgreSQL can hold it (no NUL).
	productIDPattern = regexp.MustCompile(`^[\x21-\x7e]{1,64}$`)
)

func (a *API) createOrder(c echo.Context) error {
	req, err := decodeCreate(c.Request().Body)
	if err != nil {
		return err
	}
	p := principal(c)
	switch {
	case p.UserID == "" && req.UserID == "":
		return badRequest("invalid_user_id", "user_id is required when authentication is off")
	case p.UserID == "":
		// Authentication off: the body names the user.
	case req.UserID == "":
		req.UserID = p.UserID
	case req.UserID != p.UserID:
		return &Error{Status: http.StatusForbidden, Code: "forbidden",
			Message: "user_id does not match the API key's user; orders are placed as the key's user"}
	}
	// A header sent empty is not a header left out: both would otherwise
	// place an order without a key, and the document says 1 to 255.
	keys, sent := c.Request().Header["Idempotency-Key"]
	key := c.Request().Header.Get("Idempotency-Key")
	if sent && (len(keys) != 1 || !keyPattern.MatchString(key)) {
		return badRequest("invalid_idempotency_key", "Idempotency-Key must be 1 to 255 printable ASCII characters")
	}
	ctx := c.Request().Context()
	hash := req.hash()
	if key != "" {
		if id, ok := a.rememberedKey(ctx, req.UserID, key, hash); ok {
			return replay(c, id)
		}
	}
	res, err := a.writer.submit(ctx, req, key, hash)
	if err != nil {
		return err
	}
	if key != "" {
		a.rememberKey(ctx, req.UserID, key, hash, res.order.OrderID)
	}
	if res.replayed {
		return replay(c, res.order.OrderID)
	}
	a.cacheOrder(ctx, res.order)
	a.log.InfoContext(ctx, "order created", "order_id", res.order.OrderID, "user_id", req.UserID, "amount_cents", res.order.AmountCents)
	return created(c, res.order.OrderID)
}

// created answers 201 with the order and where to read it (Location, as
// RFC 9110 asks of a 201).
func created(c echo.Context, id uuid.UUID) error {
	c.Response().Header().Set(echo.HeaderLocation, "/orders/"+id.String())
	return c.JSON(http.StatusCreated, CreateResponse{OrderID: id, Status: event.StatusCreated})
}

// replay answers a repeated Idempotency-Key exactly as the first request was
// answered, as Stripe and the IETF Idempotency-Key draft do.
func replay(c echo.Context, id uuid.UUID) error {
	c.Response().Header().Set("Idempotent-Replayed", "true")
	return created(c, id)
}

// decodeCreate reads a POST /orders body strictly: one JSON object, known
// fields only, every field valid.
func decodeCreate(body io.Reader) (CreateRequest, error) {
	// user_id is kept raw: left out, it is the key's user, but sent as ""
	// or null it is no user id at all (openapi.json: a string matching
	// the pattern), not a way of leaving it out.
	var wire struct {
		UserID json.RawMessage `json:"user_id"`
		Items  []event.Item    `json:"items"`
	}
	var req CreateRequest
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	err := dec.Decode(&wire)
	if err == nil && wire.UserID != nil {
		if err = json.Unmarshal(wire.UserID, &req.UserID); err == nil && req.UserID == "" {
			return req, badRequest("invalid_user_id", "user_id, when given, must be 1 to 64 characters of letters, digits and ._@:-")
		}
		if err != nil {
			err = &json.UnmarshalTypeError{Value: "user_id", Field: "user_id"}
		}
	}
	req.Items = wire.Items
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return req, &Error{Status: http.StatusRequestEntityTooLarge, Code: "body_too_large", Message: fmt.Sprintf("request body over %d bytes", tooLarge.Limit)}
		}
		return req, badRequest("invalid_json", "request body is not a valid order: "+jsonProblem(err))
	}
	if dec.More() {
		return req, badRequest("invalid_json", "request body has data after the JSON object")
	}
	if err := req.validate(); err != nil {
		return req, err
	}
	return req, req.mergeLines()
}

// jsonProblem says what was wrong with the JSON without echoing Go types.
func jsonProblem(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.Is(err, io.EOF):
		return "empty body"
	case errors.As(err, &syn):
		return fmt.Sprintf("malformed JSON at byte %d", syn.Offset)
	case errors.As(err, &typ):
		return fmt.Sprintf("field %q has the wrong type", typ.Field)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return "unknown field " + strings.TrimPrefix(err.Error(), "json: unknown field ")
	}
	return "malformed JSON"
}

func (r CreateRequest) validate() error {
	// user_id may be left out: the API key says who the user is.
	if r.UserID != "" && !userIDPattern.MatchString(r.UserID) {
		return badRequest("invalid_user_id", "user_id must be 1 to 64 characters of letters, digits and ._@:-")
	}
	if len(r.Items) == 0 {
		return badRequest("no_items", "items must list at least one product")
	}
	if len(r.Items) > event.MaxItems {
		return badRequest("too_many_items", fmt.Sprintf("items lists %d products, at most %d", len(r.Items), event.MaxItems))
	}
	for i, it := range r.Items {
		if !productIDPattern.MatchString(it.ProductID) {
			return badRequest("invalid_product_id", fmt.Sprintf("items[%d].product_id must be 1 to 64 printable ASCII characters", i))
		}
		if it.Qty <= 0 || it.Qty > event.MaxQty {
			return badRequest("invalid_qty", fmt.Sprintf("items[%d].qty must be 1 to %d", i, event.MaxQty))
		}
	}
	return nil
}

// mergeLines makes one line of the lines that name the same product, as a
// shop's basket does when the same thing is added twice, in the order the
// products first appear: the order, its events and the stock reservation
// then have one line per product (the saga's participants rely on that).
// A product's merged quantity is bounded as a line's is (the event
// contract's MaxQty): over it is 422, a well-formed order the shop will not
// take, which no schema can express for a sum of lines.
func (r *CreateRequest) mergeLines() error {
	at := make(map[string]int, len(r.Items))
	merged := r.Items[:0:0]
	for _, it := range r.Items {
		i, ok := at[it.ProductID]
		if !ok {
			at[it.ProductID] = len(merged)
			merged = append(merged, it)
			continue
		}
		merged[i].Qty += it.Qty
		if merged[i].Qty > event.MaxQty {
			return &Error{Status: http.StatusUnprocessableEntity, Code: "qty_over_limit",
				Message: fmt.Sprintf("product %q: %d in all over its lines, at most %d of one product per order", it.ProductID, merged[i].Qty, event.MaxQty)}
		}
	}
	r.Items = merged
	return nil
}

// hash identifies a request's content for Idempotency-Key reuse checks; item
// order does not matter.
func (r CreateRequest) hash() []byte {
	items := slices.Clone(r.Items)
	slices.SortFunc(items, func(a, b event.Item) int { return strings.Compare(a.ProductID, b.ProductID) })
	b, _ := json.Marshal(CreateRequest{UserID: r.UserID, Items: items}) // cannot fail: strings and ints
	sum := sha256.Sum256(b)
	return sum[:]
}

func (a *API) getOrder(c echo.Context) error {
	id, err := orderID(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	rctx, cancel := context.WithTimeout(ctx, redisTimeout)
	e, ok, err := a.cache.Get(rctx, id)
	cancel()
	if err != nil {
		a.log.WarnContext(c.Request().Context(), "status cache unavailable, reading PostgreSQL", "order_id", id, "err", err)
	} else if ok {
		var o Order
		if err := json.Unmarshal(e.Doc, &o); err == nil {
			if !canRead(principal(c), o.UserID) {
				return errNotFound
			}
			st, clean, err := a.confirm(ctx, id)
			if err != nil {
				return err
			}
			if clean {
				o.Status = st
				if st != e.Status {
					a.cacheOrder(ctx, o) // behind: a lost status update
				}
				c.Response().Header().Set("X-Prozess-Source", "cache")
				return c.JSON(http.StatusOK, o.viewedBy(principal(c)))
			}
			// A dead letter or a parked record the cache was not told
			// of: PostgreSQL answers, and the entry is held below.
		}
	}
	o, err := a.loadOrder(ctx, id)
	if err != nil {
		return err
	}
	a.cacheOrder(ctx, o)
	if !canRead(principal(c), o.UserID) {
		return errNotFound
	}
	c.Response().Header().Set("X-Prozess-Source", "database")
	return c.JSON(http.StatusOK, o.viewedBy(principal(c)))
}

// viewedBy is o as p may see it: an admin sees each dead letter's reason
// (PostgreSQL's error, with table and constraint names, byte-exact), the
// order's owner only its code and participant (deadletter.Entry.ForOwner):
// errors shown to users never show SQL.
func (o Order) viewedBy(p Principal) Order {
	if p.Admin || len(o.DeadLetters) == 0 {
		return o
	}
	dls := make([]deadletter.Entry, len(o.DeadLetters))
	for i, d := range o.DeadLetters {
		dls[i] = d.ForOwner()
	}
	o.DeadLetters = dls
	return o
}

// confirm is what a cache hit is checked against before it is answered:
// the order's status in PostgreSQL, and whether it has no dead letter and
// no parked record (clean). One indexed read, where a miss costs four.
//
// Holding the entry (Cache.Hold) when a record is dead-lettered or parked
// cannot be relied on to hide a cached entry: a process without Redis
// (`serve inventory` alone) dead-letters without holding, the relay parks
// without holding, and a hold fails with Redis down; a terminal entry
// lives 24 h, so readers were shown a CANCELLED order without the dead
// letter that kept its stock for as long. Every hit is confirmed instead,
// so the cache never answers what PostgreSQL contradicts, for any writer,
// whenever it wrote; it still spares a read the items, dead letters and
// parked records (three of the four statements of a miss). The status
// comes from the same row, so a lost update (Redis down when the status
// writer advanced the entry) is not shown either; and an order the
// database does not have (a restored or another database) is not found.
func (a *API) confirm(ctx context.Context, id uuid.UUID) (event.Status, bool, error) {
	var st event.Status
	var dead, parked bool
	err := a.pool.QueryRow(ctx, `
		SELECT o.status,
			EXISTS (SELECT 1 FROM dead_letters d WHERE d.order_id = o.id),
			EXISTS (SELECT 1 FROM parked p WHERE p.key = $2)
		FROM orders o WHERE o.id = $1`, id, []byte(id.String())).Scan(&st, &dead, &parked)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, errNotFound
	}
	if err != nil {
		return "", false, fmt.Errorf("confirming cached order %s: %w", id, err)
	}
	return st, !dead && !parked, nil
}

// cacheOrder fills the status cache; failures only cost the fast path. An
// order with a dead letter or a parked record is held out of it instead:
// only PostgreSQL shows those.
func (a *API) cacheOrder(ctx context.Context, o Order) {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	if len(o.DeadLetters) > 0 || len(o.Parked) > 0 {
		if err := a.cache.Hold(ctx, []uuid.UUID{o.OrderID}); err != nil {
			a.log.WarnContext(ctx, "status cache entry not held", "order_id", o.OrderID, "err", err)
		}
		return
	}
	doc := o
	doc.Status = ""
	b, err := json.Marshal(doc)
	if err == nil {
		err = a.cache.Put(ctx, o.OrderID, statuscache.Entry{Doc: b, Status: o.Status})
	}
	if err != nil {
		a.log.WarnContext(ctx, "status cache not filled", "order_id", o.OrderID, "err", err)
	}
}

func (a *API) orderEvents(c echo.Context) error {
	id, err := orderID(c)
	if err != nil {
		return err
	}
	evs, err := a.loadEvents(c.Request().Context(), id, principal(c))
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, evs)
}

func (a *API) products(c echo.Context) error {
	ps, err := a.loadProducts(c.Request().Context())
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, ps)
}

func orderID(c echo.Context) (uuid.UUID, error) {
	id, err := uuid.Parse(c.Param("id"))
	if err != nil {
		return uuid.Nil, badRequest("invalid_order_id", "order id must be a UUID")
	}
	return id, nil
}

var errNotFound = &Error{Status: http.StatusNotFound, Code: "not_found", Message: "no such order"}
