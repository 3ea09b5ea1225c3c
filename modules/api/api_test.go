package api_test

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/schema/schematest"
	"github.com/prozess/prozess/seed"
)

// testServer is the api alone, on a real database and Redis. Without Kafka
// its orders stop at CREATED with their event in the outbox, which is all
// these tests look at.
type testServer struct {
	*httptest.Server
	pool   *pgxpool.Pool
	api    *api.API
	keys   map[string]string // user -> API key; "admin" is an admin key
	rdb    rueidis.Client    // the status cache's Redis, under prefix
	prefix string
}

func server(t *testing.T) *testServer {
	return serverWith(t, api.AuthConfig{Rate: 1000, Burst: 1000})
}

func serverWith(t *testing.T, auth api.AuthConfig) *testServer {
	t.Helper()
	t.Parallel()
	pool := schematest.NewPool(t)
	if _, err := seed.Load(t.Context(), pool, true); err != nil {
		t.Fatal(err)
	}
	rdb, prefix := schematest.NewRedis(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	e := echo.New()
	e.HTTPErrorHandler = api.ErrorHandler(log)
	e.Use(middleware.BodyLimit(fmt.Sprintf("%dB", api.MaxBodyBytes)))
	a := api.New(log, pool, rdb, api.Config{Prefix: prefix, Topic: "order-events", Auth: auth})
	a.Register(e)
	go a.Run(t.Context())
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	ts := &testServer{Server: srv, pool: pool, api: a, keys: map[string]string{}, rdb: rdb, prefix: prefix}
	for _, u := range []string{"u1", "u2", "admin"} {
		_, key, err := api.CreateKey(t.Context(), pool, u, u == "admin")
		if err != nil {
			t.Fatal(err)
		}
		ts.keys[u] = key
	}
	return ts
}

// do sends a request as user ("" for no key) and returns status and body.
func (ts *testServer) do(t *testing.T, method, path, user, body string, hdr ...string) (int, []byte, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if user != "" {
		req.Header.Set("Authorization", "Bearer "+ts.keys[user])
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header
}

func post(t *testing.T, ts *testServer, body, key string) (int, []byte) {
	t.Helper()
	var hdr []string
	if key != "" {
		hdr = []string{"Idempotency-Key", key}
	}
	user := "u1"
	if strings.Contains(body, `"user_id":"u2"`) {
		user = "u2"
	}
	c, b, _ := ts.do(t, http.MethodPost, "/orders", user, body, hdr...)
	return c, b
}

func count(t *testing.T, pool *pgxpool.Pool, table string) int64 {
	return schematest.Int(t, pool, "SELECT count(*) FROM "+table)
}

func TestBadInputIsRefusedAndChangesNothing(t *testing.T) {
	srv := server(t)
	pool := srv.pool
	item := `{"product_id":"prod-mouse","qty":1}`
	many := strings.TrimSuffix(strings.Repeat(`{"product_id":"p`+`%d","qty":1},`, 101), ",")
	for i := range 101 {
		many = strings.Replace(many, "%d", fmt.Sprint(i), 1)
	}
	for _, tc := range []struct {
		name, body string
		status     int
		code       string
	}{
		{"malformed JSON", `{"user_id":"u1","items":[`, 400, "invalid_json"},
		{"not an object", `[1,2]`, 400, "invalid_json"},
		{"empty body", ``, 400, "invalid_json"},
		{"trailing data", `{"user_id":"u1","items":[` + item + `]} {}`, 400, "invalid_json"},
		{"unknown field", `{"user_id":"u1","items":[` + item + `],"status":"SHIPPED"}`, 400, "invalid_json"},
		{"unknown item field", `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":1,"price_cents":0}]}`, 400, "invalid_json"},
		{"wrong type", `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":"2"}]}`, 400, "invalid_json"},
		{"bad user", `{"user_id":"<script>","items":[` + item + `]}`, 400, "invalid_user_id"},
		{"empty user", `{"user_id":"","items":[` + item + `]}`, 400, "invalid_user_id"},
		{"null user", `{"user_id":null,"items":[` + item + `]}`, 400, "invalid_user_id"},
		{"user not a string", `{"user_id":7,"items":[` + item + `]}`, 400, "invalid_json"},
		{"no items", `{"user_id":"u1","items":[]}`, 400, "no_items"},
		{"items missing", `{"user_id":"u1"}`, 400, "no_items"},
		{"too many items", `{"user_id":"u1","items":[` + many + `]}`, 400, "too_many_items"},
		{"qty zero", `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":0}]}`, 400, "invalid_qty"},
		{"qty negative", `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":-3}]}`, 400, "invalid_qty"},
		{"qty absurd", `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":1000001}]}`, 400, "invalid_qty"},
		{"qty overflow", `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":99999999999999999999}]}`, 400, "invalid_json"},
		{"empty product", `{"user_id":"u1","items":[{"product_id":"","qty":1}]}`, 400, "invalid_product_id"},
		{"product id with a space", `{"user_id":"u1","items":[{"product_id":"prod mouse","qty":1}]}`, 400, "invalid_product_id"},
		{"product id with a NUL", `{"user_id":"u1","items":[{"product_id":"prod-\u0000","qty":1}]}`, 400, "invalid_product_id"},
		{"product id of 64 bytes over 64", `{"user_id":"u1","items":[{"product_id":"` + strings.Repeat("é", 33) + `","qty":1}]}`, 400, "invalid_product_id"},
		{"one product over 1000 in all", `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":600},{"product_id":"prod-mouse","qty":401}]}`, 422, "qty_over_limit"},
		{"unknown product", `{"user_id":"u1","items":[{"product_id":"prod-unicorn","qty":1}]}`, 422, "unknown_product"},
		{"oversized body", `{"user_id":"u1","items":[` + item + `],"pad":"` + strings.Repeat("x", api.MaxBodyBytes) + `"}`, 413, "body_too_large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, body := post(t, srv, tc.body, "")
			var e struct {
				Error struct{ Code, Message string }
			}
			if err := json.Unmarshal(body, &e); err != nil {
				t.Fatalf("body %q is not a JSON error: %v", body, err)
			}
			if status != tc.status || e.Error.Code != tc.code || e.Error.Message == "" {
				t.Fatalf("got %d %s, want %d %s", status, body, tc.status, tc.code)
			}
		})
	}
	t.Run("bad idempotency key", func(t *testing.T) {
		status, body := post(t, srv, `{"user_id":"u1","items":[`+item+`]}`, strings.Repeat("k", 300))
		if status != 400 || !strings.Contains(string(body), "invalid_idempotency_key") {
			t.Fatalf("got %d %s", status, body)
		}
	})
	t.Run("empty idempotency key", func(t *testing.T) {
		// Sent empty is not left out: the document says 1 to 255.
		status, body, _ := srv.do(t, http.MethodPost, "/orders", "u1", `{"items":[`+item+`]}`, "Idempotency-Key", "")
		if status != 400 || !strings.Contains(string(body), "invalid_idempotency_key") {
			t.Fatalf("got %d %s", status, body)
		}
	})
	for _, table := range []string{"orders", "order_items", "outbox"} {
		if n := count(t, pool, table); n != 0 {
			t.Errorf("%d rows in %s after bad requests only", n, table)
		}
	}
}

func TestUnknownRoutesAndOrdersAnswerJSON(t *testing.T) {
	srv := server(t)
	for _, tc := range []struct {
		path   string
		status int
		code   string
	}{
		{"/orders/0192f0c4-0000-7000-8000-000000000000", 404, "not_found"},
		{"/orders/0192f0c4-0000-7000-8000-000000000000/events", 404, "not_found"},
		{"/orders/not-a-uuid", 400, "invalid_order_id"},
		{"/nowhere", 404, "not_found"},
	} {
		code, b, _ := srv.do(t, http.MethodGet, tc.path, "u1", "")
		if code != tc.status || !strings.Contains(string(b), `"code":"`+tc.code+`"`) {
			t.Errorf("GET %s: %d %s, want %d %s", tc.path, code, b, tc.status, tc.code)
		}
	}
}

// A method the document does not list on a path it does is 405 with Allow
// (not 404, as it was for every path under /orders), in the one error
// format, with or without a key.
func TestUnlistedMethodsAre405WithAllow(t *testing.T) {
	srv := server(t)
	id := "/orders/0192f0c4-0000-7000-8000-000000000000"
	for _, tc := range []struct{ method, path, allow string }{
		{"TRACE", "/orders", "POST"},
		{"DELETE", "/orders", "POST"},
		{"PUT", id, "GET"},
		{"PATCH", id + "/events", "GET"},
		{"TRACE", "/products", "GET"},
		{"DELETE", "/live/stream", "GET"},
		{"GET", "/admin/dead-letters/1/replay", "POST"},
	} {
		for _, user := range []string{"u1", ""} {
			code, b, hdr := srv.do(t, tc.method, tc.path, user, "")
			if code != 405 || !strings.Contains(string(b), `"code":"method_not_allowed"`) || !strings.Contains(hdr.Get("Allow"), tc.allow) {
				t.Errorf("%s %s (key %q): %d Allow %q %s, want 405 allowing %s", tc.method, tc.path, user, code, hdr.Get("Allow"), b, tc.allow)
			}
		}
	}
}

// Lines naming the same product become one line with their quantities
// added, in the order, its items and its OrderCreated; the answer says
// where the order is (Location).
func TestSameProductOnTwoLinesIsOneLine(t *testing.T) {
	srv := server(t)
	status, body, hdr := srv.do(t, http.MethodPost, "/orders", "u1",
		`{"items":[{"product_id":"prod-mouse","qty":2},{"product_id":"prod-keyboard","qty":1},{"product_id":"prod-mouse","qty":3}]}`)
	if status != 201 {
		t.Fatalf("%d %s", status, body)
	}
	var created api.CreateResponse
	if err := json.Unmarshal(body, &created); err != nil {
		t.Fatal(err)
	}
	if loc := hdr.Get("Location"); loc != "/orders/"+created.OrderID.String() {
		t.Fatalf("Location %q for order %s", loc, created.OrderID)
	}
	if n := schematest.Int(t, srv.pool, `SELECT qty FROM order_items WHERE order_id = $1 AND product_id = 'prod-mouse'`, created.OrderID); n != 5 {
		t.Fatalf("prod-mouse qty %d, want 2+3", n)
	}
	if n := schematest.Int(t, srv.pool, `SELECT amount_cents FROM orders WHERE id = $1`, created.OrderID); n != 5*2999+8999 {
		t.Fatalf("amount %d", n)
	}
	var payload string
	if err := srv.pool.QueryRow(t.Context(), `SELECT convert_from(value, 'UTF8') FROM outbox`).Scan(&payload); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(payload, `"items":[{"product_id":"prod-mouse","qty":5},{"product_id":"prod-keyboard","qty":1}]`) {
		t.Fatalf("OrderCreated payload %s, want the lines merged in first-seen order", payload)
	}
}

func TestCreateWritesOrderItemsAndEventTogether(t *testing.T) {
	srv := server(t)
	pool := srv.pool
	status, body := post(t, srv, `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":2},{"product_id":"prod-keyboard","qty":1}]}`, "")
	if status != 201 {
		t.Fatalf("%d %s", status, body)
	}
	var created api.CreateResponse
	if err := json.Unmarshal(body, &created); err != nil || created.Status != "CREATED" {
		t.Fatalf("%s: %v", body, err)
	}
	if n := schematest.Int(t, pool, `SELECT count(*) FROM order_items WHERE order_id = $1`, created.OrderID); n != 2 {
		t.Fatalf("%d items stored, want 2", n)
	}
	if n := schematest.Int(t, pool, `SELECT amount_cents FROM orders WHERE id = $1`, created.OrderID); n != 2*2999+8999 {
		t.Fatalf("amount %d", n)
	}
	if n := count(t, pool, "outbox"); n != 1 {
		t.Fatalf("%d outbox rows, want the one OrderCreated", n)
	}
	_, b, hdr := srv.do(t, http.MethodGet, "/orders/"+created.OrderID.String(), "u1", "")
	var o api.Order
	if err := json.Unmarshal(b, &o); err != nil || o.Status != "CREATED" || len(o.Items) != 2 || o.UserID != "u1" {
		t.Fatalf("GET answered %+v (%v)", o, err)
	}
	if src := hdr.Get("X-Prozess-Source"); src != "cache" {
		t.Fatalf("GET right after POST answered from %q, want the cache", src)
	}
}

// Fifty concurrent POSTs with one Idempotency-Key create exactly one order
// and all get the same answer; the same key with another body is refused.
func TestIdempotencyKey(t *testing.T) {
	srv := server(t)
	pool := srv.pool
	body := `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":1}]}`
	const n = 50
	answers := make([]string, n)
	codes := make([]int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, b := post(t, srv, body, "key-1")
			codes[i], answers[i] = c, string(b)
		}()
	}
	wg.Wait()
	for i := range n {
		if codes[i] != 201 || answers[i] != answers[0] {
			t.Fatalf("answer %d: %d %s, want 201 %s", i, codes[i], answers[i], answers[0])
		}
	}
	if o, e := count(t, pool, "orders"), count(t, pool, "outbox"); o != 1 || e != 1 {
		t.Fatalf("%d orders and %d events for one key, want 1 and 1", o, e)
	}
	if c, b := post(t, srv, body, "key-1"); c != 201 || string(b) != answers[0] {
		t.Fatalf("resubmit: %d %s", c, b)
	}
	if c, b := post(t, srv, `{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":2}]}`, "key-1"); c != 422 || !strings.Contains(string(b), "idempotency_key_reused") {
		t.Fatalf("same key, other body: %d %s", c, b)
	}
	// Keys are per user: another user's identical key is another order.
	if c, _ := post(t, srv, `{"user_id":"u2","items":[{"product_id":"prod-mouse","qty":1}]}`, "key-1"); c != 201 {
		t.Fatalf("other user, same key: %d", c)
	}
	if o := count(t, pool, "orders"); o != 2 {
		t.Fatalf("%d orders, want 2", o)
	}
}
