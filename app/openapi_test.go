package app_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/google/uuid"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
)

// contract is the OpenAPI document, validated, with a router for a server.
type contract struct {
	doc    *openapi3.T
	router routers.Router
}

func loadContract(t *testing.T, serverURL string) *contract {
	t.Helper()
	doc, err := openapi3.NewLoader().LoadFromData(api.OpenAPI)
	if err != nil {
		t.Fatalf("openapi.json does not load: %v", err)
	}
	if err := doc.Validate(t.Context()); err != nil {
		t.Fatalf("openapi.json is not a valid OpenAPI 3 document: %v", err)
	}
	doc.Servers = openapi3.Servers{{URL: serverURL}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	return &contract{doc: doc, router: router}
}

// call is one real request and what the test expects of it.
type call struct {
	name    string
	method  string
	path    string
	key     string // API key; "" for none
	headers map[string]string
	body    string
	status  int
	// invalid marks a request that breaks the contract on purpose (bad
	// input): only its response is checked against the document.
	invalid bool
}

// check makes the call and validates request and response against the
// document: the operation must exist, the status must be documented, and
// the body and headers must match its schema.
func (c *contract) check(t *testing.T, base string, cl call) []byte {
	t.Helper()
	var body io.Reader
	if cl.body != "" {
		body = strings.NewReader(cl.body)
	}
	req, _ := http.NewRequestWithContext(t.Context(), cl.method, base+cl.path, body)
	if cl.body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if cl.key != "" {
		req.Header.Set("Authorization", "Bearer "+cl.key)
	}
	for k, v := range cl.headers {
		req.Header.Set(k, v)
	}
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		t.Fatalf("%s: %s %s is not in the document: %v", cl.name, cl.method, cl.path, err)
	}
	in := &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}}
	if !cl.invalid {
		// Validating reads the body; give the request a fresh copy after.
		if err := openapi3filter.ValidateRequest(t.Context(), in); err != nil {
			t.Fatalf("%s: the request breaks the document: %v", cl.name, err)
		}
		if cl.body != "" { // as sent: validating may have filled in defaults
			req.Body, req.ContentLength = io.NopCloser(strings.NewReader(cl.body)), int64(len(cl.body))
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", cl.name, err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != cl.status {
		t.Fatalf("%s: status %d, want %d: %s", cl.name, resp.StatusCode, cl.status, got)
	}
	opts := &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true}
	if ct := resp.Header.Get("Content-Type"); strings.HasPrefix(ct, "text/html") {
		opts.ExcludeResponseBody = true // HTML is not JSON-schema material
	}
	err = openapi3filter.ValidateResponse(t.Context(), &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header,
		Body: io.NopCloser(bytes.NewReader(got)), Options: opts,
	})
	if err != nil {
		t.Errorf("%s: the %d response breaks the document: %v\n%s", cl.name, resp.StatusCode, err, got)
	}
	return got
}

// schema validates v against a named schema of the document.
func (c *contract) schema(t *testing.T, name string, data []byte) {
	t.Helper()
	s, ok := c.doc.Components.Schemas[name]
	if !ok {
		t.Fatalf("no schema %s", name)
	}
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := s.Value.VisitJSON(v); err != nil {
		t.Errorf("%s breaks the document: %v\n%s", name, err, data)
	}
}

// streamEvent validates one live-stream message as schemathesis does,
// against the document's schema of one event (LiveStreamEvent: its name
// and data), and its data against the schema that event's x-data-schema
// names.
func (c *contract) streamEvent(t *testing.T, name string, data []byte) {
	t.Helper()
	ev, err := json.Marshal(map[string]string{"event": name, "data": string(data)})
	if err != nil {
		t.Fatal(err)
	}
	c.schema(t, "LiveStreamEvent", ev)
	for _, one := range c.doc.Components.Schemas["LiveStreamEvent"].Value.OneOf {
		p := one.Value.Properties
		if enum := p["event"].Value.Enum; len(enum) == 1 && enum[0] == name {
			ref, _ := p["data"].Value.Extensions["x-data-schema"].(string)
			c.schema(t, strings.TrimPrefix(ref, "#/components/schemas/"), data)
			return
		}
	}
	t.Errorf("stream event %q has no schema in LiveStreamEvent", name)
}

// The OpenAPI document is valid, served as is at /openapi.json, and every
// real response of every endpoint (successes and the errors a client can
// cause) matches it, as do the live stream's messages.
func TestOpenAPIContract(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	c := loadContract(t, r.url)
	u1, u2 := e.keyFor("u1"), e.keyFor("u2")

	served := c.check(t, r.url, call{name: "document", method: "GET", path: "/openapi.json", status: 200})
	if !bytes.Equal(served, api.OpenAPI) {
		t.Error("/openapi.json is not the embedded document")
	}
	c.check(t, r.url, call{name: "index", method: "GET", path: "/", status: 200})
	c.check(t, r.url, call{name: "products", method: "GET", path: "/products", status: 200})
	c.check(t, r.url, call{name: "live page", method: "GET", path: "/live", status: 200})

	// The live stream's first message, then an order's events on it.
	stream := openStream(t, r.url, u1)
	name, data := stream.next(t)
	if name != "snapshot" {
		t.Fatalf("first stream message is %q", name)
	}
	c.streamEvent(t, name, data)

	order := `{"items":[{"product_id":"prod-mouse","qty":1}]}`
	created := c.check(t, r.url, call{name: "create", method: "POST", path: "/orders", key: u1, body: order,
		headers: map[string]string{"Idempotency-Key": "contract-1"}, status: 201})
	c.check(t, r.url, call{name: "replay", method: "POST", path: "/orders", key: u1, body: order,
		headers: map[string]string{"Idempotency-Key": "contract-1"}, status: 201})
	var res api.CreateResponse
	if err := json.Unmarshal(created, &res); err != nil {
		t.Fatal(err)
	}
	id := res.OrderID.String()
	r.await(t, id, 15*time.Second)
	for range 4 {
		name, data := stream.next(t)
		if name != "order" {
			t.Fatalf("stream message %q, want order", name)
		}
		c.streamEvent(t, name, data)
	}
	c.check(t, r.url, call{name: "get order", method: "GET", path: "/orders/" + id, key: u1, status: 200})
	events := c.check(t, r.url, call{name: "events", method: "GET", path: "/orders/" + id + "/events", key: u1, status: 200})
	if !bytes.Contains(events, []byte("OrderShipped")) {
		t.Errorf("events: %s", events)
	}
	// An order with no recorded events yet has an empty trail, not null.
	bare := uuid.Must(uuid.NewV7())
	if _, err := e.pool.Exec(context.Background(), `INSERT INTO orders (id, user_id, status, amount_cents) VALUES ($1, 'u1', 'CREATED', 0)`, bare); err != nil {
		t.Fatal(err)
	}
	c.check(t, r.url, call{name: "empty trail", method: "GET", path: "/orders/" + bare.String() + "/events", key: u1, status: 200})
	// Listing: a page with a next_cursor, the page after it, an admin's.
	var page api.ListResponse
	if err := json.Unmarshal(c.check(t, r.url, call{name: "list", method: "GET", path: "/orders?limit=1", key: u1, status: 200}), &page); err != nil || page.NextCursor == "" {
		t.Fatalf("list: %+v %v", page, err)
	}
	c.check(t, r.url, call{name: "list, next page", method: "GET", path: "/orders?limit=1&cursor=" + page.NextCursor, key: u1, status: 200})
	c.check(t, r.url, call{name: "list as admin", method: "GET", path: "/orders?user_id=u1&status=SHIPPED", key: e.keyFor("admin"), status: 200})
	// A cancel, and its repeat, of an order that has not shipped.
	c.check(t, r.url, call{name: "cancel", method: "POST", path: "/orders/" + bare.String() + "/cancel", key: u1, status: 202})
	c.check(t, r.url, call{name: "cancel again", method: "POST", path: "/orders/" + bare.String() + "/cancel", key: u1, status: 202})
	// The cancel's OrderCancelRequested on the stream: it moves no status,
	// so its status is left out, as the document allows.
	for i := 0; ; i++ {
		name, data := stream.next(t)
		c.streamEvent(t, name, data)
		var ev map[string]any
		if err := json.Unmarshal(data, &ev); err != nil || name != "order" || i > 10 {
			t.Fatalf("stream message %q %s: no OrderCancelRequested (%v)", name, data, err)
		}
		if ev["type"] == string(event.OrderCancelRequested) {
			if _, has := ev["status"]; has {
				t.Errorf("OrderCancelRequested on the stream has a status: %s", data)
			}
			break
		}
	}

	// Errors a client can cause, each in the one error format.
	for _, cl := range []call{
		{name: "no key", method: "POST", path: "/orders", body: order, status: 401},
		{name: "bad key", method: "GET", path: "/orders/" + id, key: "pz_nope", status: 401},
		{name: "bad qty", method: "POST", path: "/orders", key: u1, body: `{"items":[{"product_id":"prod-mouse","qty":0}]}`, status: 400, invalid: true},
		{name: "unknown field", method: "POST", path: "/orders", key: u1, body: `{"items":[],"x":1}`, status: 400, invalid: true},
		{name: "malformed", method: "POST", path: "/orders", key: u1, body: `{"items":`, status: 400, invalid: true},
		{name: "another user", method: "POST", path: "/orders", key: u1, body: `{"user_id":"u2","items":[{"product_id":"prod-mouse","qty":1}]}`, status: 403},
		{name: "unknown product", method: "POST", path: "/orders", key: u1, body: `{"items":[{"product_id":"prod-nope","qty":1}]}`, status: 422},
		{name: "key reused", method: "POST", path: "/orders", key: u1, body: `{"items":[{"product_id":"prod-mouse","qty":2}]}`,
			headers: map[string]string{"Idempotency-Key": "contract-1"}, status: 422},
		{name: "too large", method: "POST", path: "/orders", key: u1, body: `{"items":[` + strings.Repeat(`{"product_id":"prod-mouse","qty":1},`, 2000) + `{}]}`, status: 413, invalid: true},
		{name: "not a uuid", method: "GET", path: "/orders/42", key: u1, status: 400, invalid: true},
		{name: "no such order", method: "GET", path: "/orders/" + uuid.NewString(), key: u1, status: 404},
		{name: "not yours", method: "GET", path: "/orders/" + id, key: u2, status: 404},
		{name: "list, bad limit", method: "GET", path: "/orders?limit=0", key: u1, status: 400, invalid: true},
		{name: "list, bad cursor", method: "GET", path: "/orders?cursor=nope", key: u1, status: 422},
		{name: "list, empty cursor", method: "GET", path: "/orders?cursor=", key: u1, status: 400, invalid: true},
		{name: "list another user's", method: "GET", path: "/orders?user_id=u2", key: u1, status: 403},
		{name: "not your events", method: "GET", path: "/orders/" + id + "/events", key: u2, status: 404},
		{name: "cancel a shipped order", method: "POST", path: "/orders/" + id + "/cancel", key: u1, status: 409},
		{name: "cancel, not yours", method: "POST", path: "/orders/" + id + "/cancel", key: u2, status: 404},
		{name: "cancel, not a uuid", method: "POST", path: "/orders/42/cancel", key: u1, status: 400, invalid: true},
		{name: "stream without key", method: "GET", path: "/live/stream", status: 401},
		{name: "re-drive as a user", method: "POST", path: "/admin/dead-letters/1/replay", key: u1, status: 404},
		{name: "re-drive, bad id", method: "POST", path: "/admin/dead-letters/x/replay", key: e.keyFor("admin"), status: 400, invalid: true},
		{name: "re-drive, no such dead letter", method: "POST", path: "/admin/dead-letters/999/replay", key: e.keyFor("admin"), status: 404},
		{name: "bulk re-drive as a user", method: "POST", path: "/admin/dead-letters/replay", key: u1, body: `{"dry_run":true}`, status: 403},
		{name: "bulk re-drive, bad filter", method: "POST", path: "/admin/dead-letters/replay", key: e.keyFor("admin"), body: `{"filter":{"since":"yesterday"},"dry_run":true}`, status: 400, invalid: true},
		{name: "bulk re-drive, dry run", method: "POST", path: "/admin/dead-letters/replay", key: e.keyFor("admin"), body: `{"filter":{"participant":"delivery"},"dry_run":true}`, status: 200},
		{name: "bulk unpark as a user", method: "POST", path: "/admin/parked/replay", key: u1, body: `{"dry_run":false}`, status: 403},
		{name: "bulk unpark, no dry_run", method: "POST", path: "/admin/parked/replay", key: e.keyFor("admin"), body: `{"filter":{}}`, status: 400, invalid: true},
		{name: "bulk unpark, nothing parked", method: "POST", path: "/admin/parked/replay", key: e.keyFor("admin"), body: `{"dry_run":false}`, status: 200},
		{name: "unpark as a user", method: "POST", path: "/admin/parked/1/replay", key: u1, status: 404},
		{name: "unpark, bad id", method: "POST", path: "/admin/parked/x/replay", key: e.keyFor("admin"), status: 400, invalid: true},
		{name: "unpark, no such parked record", method: "POST", path: "/admin/parked/999/replay", key: e.keyFor("admin"), status: 404},
	} {
		c.check(t, r.url, cl)
	}

	// PostgreSQL not answering within 5 s (here a lock held on the tables
	// each endpoint reads) is 503 with Retry-After, as documented, for the
	// live stream's snapshot, the listing, a cancel and the bulk re-drives
	// too; the requests run in parallel, the lock held until all are done.
	t.Run("database too slow", func(t *testing.T) {
		tx, err := e.pool.Begin(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tx.Rollback(context.Background()) })
		if _, err := tx.Exec(t.Context(), `LOCK TABLE products, orders, dead_letters, parked IN ACCESS EXCLUSIVE MODE`); err != nil {
			t.Fatal(err)
		}
		admin := e.keyFor("admin")
		for _, cl := range []call{
			{name: "products", method: "GET", path: "/products"},
			{name: "stream", method: "GET", path: "/live/stream", key: u1},
			{name: "list", method: "GET", path: "/orders", key: u1},
			{name: "cancel", method: "POST", path: "/orders/" + id + "/cancel", key: u1},
			{name: "bulk re-drive", method: "POST", path: "/admin/dead-letters/replay", key: admin, body: `{"dry_run":true}`},
			{name: "bulk unpark", method: "POST", path: "/admin/parked/replay", key: admin, body: `{"dry_run":true}`},
		} {
			t.Run(cl.name, func(t *testing.T) {
				t.Parallel()
				cl.name, cl.status = cl.name+", database too slow", 503
				c.check(t, r.url, cl)
			})
		}
	})
}

// sseStream reads Server-Sent Events messages.
type sseStream struct {
	sc   *bufio.Scanner
	msgs chan [2]string
}

func openStream(t *testing.T, base, key string) *sseStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", base+"/live/stream", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("stream: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	s := &sseStream{sc: bufio.NewScanner(resp.Body), msgs: make(chan [2]string, 64)}
	go func() {
		var name, data string
		for s.sc.Scan() {
			line := s.sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				data += strings.TrimPrefix(line, "data: ")
			case line == "" && data != "":
				s.msgs <- [2]string{name, data}
				name, data = "", ""
			}
		}
		close(s.msgs)
	}()
	return s
}

func (s *sseStream) next(t *testing.T) (string, []byte) {
	t.Helper()
	select {
	case m, ok := <-s.msgs:
		if !ok {
			t.Fatal("stream ended")
		}
		return m[0], []byte(m[1])
	case <-time.After(15 * time.Second):
		t.Fatal("no stream message within 15s")
		return "", nil
	}
}
