package api_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/uuid"

	"github.com/prozess/prozess/modules/api"
)

// list GETs /orders?query as user and decodes the page; it fails the test
// on anything but 200.
func list(t *testing.T, ts *testServer, user, query string) api.ListResponse {
	t.Helper()
	code, b, _ := ts.do(t, http.MethodGet, "/orders?"+query, user, "")
	var page api.ListResponse
	if code != http.StatusOK || json.Unmarshal(b, &page) != nil {
		t.Fatalf("%s: GET /orders?%s: %d %s", user, query, code, b)
	}
	return page
}

// tryOrder places one order as user, from any goroutine.
func tryOrder(ts *testServer, user string) (uuid.UUID, error) {
	req, _ := http.NewRequest(http.MethodPost, ts.URL+"/orders", strings.NewReader(`{"items":[{"product_id":"prod-mouse","qty":1}]}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+ts.keys[user])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return uuid.Nil, fmt.Errorf("%s ordering: %w", user, err)
	}
	defer resp.Body.Close()
	var c api.CreateResponse
	if err := json.NewDecoder(resp.Body).Decode(&c); err != nil || resp.StatusCode != http.StatusCreated {
		return uuid.Nil, fmt.Errorf("%s ordering: %d (%v)", user, resp.StatusCode, err)
	}
	return c.OrderID, nil
}

// placeMany places n orders as user, from workers goroutines, and returns
// their ids.
func placeMany(t *testing.T, ts *testServer, user string, n, workers int) map[uuid.UUID]bool {
	t.Helper()
	var mu sync.Mutex
	ids := make(map[uuid.UUID]bool, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for next.Add(1) <= int64(n) {
				id, err := tryOrder(ts, user)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				ids[id] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return ids
}

// GET /orders pages through 1,000 orders, newest first, with no order
// missing and none shown twice, while new orders keep arriving: placed by
// a goroutine the whole time, and a few more between every two pages, so
// that every page is read after orders it does not show were placed.
// Pagination by offset fails this (each new order shifts the next page
// down by one: repeats); a keyset compare that is off by one repeats the
// page's last order; a cursor that points at the wrong end of the page
// skips or repeats the rest of it.
func TestListPagesThrough1000OrdersWhileOrdersArrive(t *testing.T) {
	ts := serverWith(t, api.AuthConfig{Rate: 1e6, Burst: 1e6})
	initial := placeMany(t, ts, "u1", 1000, 8)
	others := placeMany(t, ts, "u2", 20, 2)

	stop := make(chan struct{})
	var during atomic.Int64
	var wg sync.WaitGroup
	stopPlacing := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopPlacing() // before the server closes, also when the test fails
	for _, user := range []string{"u1", "u2"} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := tryOrder(ts, user); err != nil {
					t.Error(err)
					return
				}
				during.Add(1)
			}
		})
	}
	seen := map[uuid.UUID]bool{}
	var last uuid.UUID // the previous order listed; ids only go down
	pages, query := 0, "limit=37"
	for {
		page := list(t, ts, "u1", query)
		pages++
		for _, o := range page.Orders {
			if o.UserID != "u1" {
				t.Fatalf("page %d lists %s's order %s to u1", pages, o.UserID, o.OrderID)
			}
			if seen[o.OrderID] {
				t.Fatalf("page %d repeats order %s", pages, o.OrderID)
			}
			if last != uuid.Nil && o.OrderID.String() >= last.String() {
				t.Fatalf("page %d: order %s follows %s: not newest first", pages, o.OrderID, last)
			}
			if len(o.Items) != 1 || o.Items[0].ProductID != "prod-mouse" || o.Status != "CREATED" {
				t.Fatalf("page %d: order %+v", pages, o)
			}
			seen[o.OrderID], last = true, o.OrderID
		}
		if page.NextCursor == "" {
			if len(page.Orders) > 37 {
				t.Fatalf("the last page holds %d orders, limit 37", len(page.Orders))
			}
			break
		}
		if len(page.Orders) != 37 {
			t.Fatalf("page %d holds %d orders and has a next page", pages, len(page.Orders))
		}
		// More orders between every two pages, newer than every one listed.
		for range 3 {
			createOrder(t, ts, "u1")
		}
		createOrder(t, ts, "u2")
		query = "limit=37&cursor=" + url.QueryEscape(page.NextCursor)
	}
	stopPlacing()
	for id := range initial {
		if !seen[id] {
			t.Errorf("order %s, placed before the listing began, was never listed", id)
		}
	}
	for id := range others {
		if seen[id] {
			t.Errorf("u2's order %s was listed to u1", id)
		}
	}
	if pages < 1000/37 || during.Load() == 0 {
		t.Fatalf("%d pages, %d orders placed by the goroutines while paging", pages, during.Load())
	}
	t.Logf("%d pages, %d orders listed; %d placed by the goroutines and %d between pages while paging",
		pages, len(seen), during.Load(), 4*(pages-1))
}

// A user lists only their own orders, whatever they ask: user_id of
// another user is 403, another listing's cursor is 400; an admin lists
// everyone's, or one user's with user_id, and filters by status.
func TestListShowsOnlyTheCallersOrders(t *testing.T) {
	ts := server(t)
	mine := placeMany(t, ts, "u1", 5, 1)
	theirs := placeMany(t, ts, "u2", 3, 1)
	shipped := createOrder(t, ts, "u2")
	if _, err := ts.pool.Exec(t.Context(), `UPDATE orders SET status = 'SHIPPED' WHERE id = $1`, shipped); err != nil {
		t.Fatal(err)
	}
	theirs[shipped] = true
	ids := func(p api.ListResponse) map[uuid.UUID]bool {
		m := map[uuid.UUID]bool{}
		for _, o := range p.Orders {
			m[o.OrderID] = true
		}
		return m
	}
	same := func(name string, got, want map[uuid.UUID]bool) {
		t.Helper()
		if len(got) != len(want) {
			t.Errorf("%s: %d orders, want %d", name, len(got), len(want))
		}
		for id := range want {
			if !got[id] {
				t.Errorf("%s: order %s missing", name, id)
			}
		}
	}
	same("u1's own", ids(list(t, ts, "u1", "")), mine)
	same("u2's own", ids(list(t, ts, "u2", "")), theirs)
	same("u2 naming itself", ids(list(t, ts, "u2", "user_id=u2")), theirs)
	same("u2's shipped", ids(list(t, ts, "u2", "status=SHIPPED")), map[uuid.UUID]bool{shipped: true})
	same("u1's shipped", ids(list(t, ts, "u1", "status=SHIPPED")), map[uuid.UUID]bool{})
	all := map[uuid.UUID]bool{}
	for id := range mine {
		all[id] = true
	}
	for id := range theirs {
		all[id] = true
	}
	same("admin, everyone's", ids(list(t, ts, "admin", "")), all)
	same("admin, u1's", ids(list(t, ts, "admin", "user_id=u1")), mine)
	same("admin, shipped", ids(list(t, ts, "admin", "status=SHIPPED")), map[uuid.UUID]bool{shipped: true})

	code, b, _ := ts.do(t, http.MethodGet, "/orders?user_id=u1", "u2", "")
	if code != http.StatusForbidden || !strings.Contains(string(b), `"forbidden"`) || strings.Contains(string(b), "order_id") {
		t.Errorf("u2 listing u1's orders: %d %s, want 403 forbidden and no orders", code, b)
	}
	// u1's cursor, and an admin's over everyone's, are not u2's.
	c1 := list(t, ts, "u1", "limit=1").NextCursor
	ca := list(t, ts, "admin", "limit=1").NextCursor
	for _, c := range []string{c1, ca} {
		code, b, _ := ts.do(t, http.MethodGet, "/orders?cursor="+url.QueryEscape(c), "u2", "")
		if code != http.StatusUnprocessableEntity || !strings.Contains(string(b), `"invalid_cursor"`) {
			t.Errorf("u2 with another listing's cursor: %d %s, want 422 invalid_cursor", code, b)
		}
	}
}

// Bad query parameters are 400 with the one JSON error format; no key is
// 401.
func TestListRefusesBadParameters(t *testing.T) {
	ts := server(t)
	createOrder(t, ts, "u1")
	createOrder(t, ts, "u1")
	next := list(t, ts, "u1", "limit=1").NextCursor
	if next == "" {
		t.Fatal("two orders at limit=1 gave no next_cursor")
	}
	raw, _ := base64.RawURLEncoding.DecodeString(next)
	forge := func(s string) string { return url.QueryEscape(base64.RawURLEncoding.EncodeToString([]byte(s))) }
	var cur map[string]any
	if err := json.Unmarshal(raw, &cur); err != nil {
		t.Fatalf("cursor %q: %v", raw, err)
	}
	after := cur["after"]
	for _, tc := range []struct {
		query, code string
		status      int
	}{
		{"status=NOPE", "invalid_status", http.StatusBadRequest},
		{"status=shipped", "invalid_status", http.StatusBadRequest},
		{"status=", "invalid_status", http.StatusBadRequest},
		{"limit=0", "invalid_limit", http.StatusBadRequest},
		{"limit=101", "invalid_limit", http.StatusBadRequest},
		{"limit=-1", "invalid_limit", http.StatusBadRequest},
		{"limit=ten", "invalid_limit", http.StatusBadRequest},
		{"limit=", "invalid_limit", http.StatusBadRequest},
		{"cursor=", "invalid_cursor", http.StatusBadRequest},
		{"cursor=%25%25%25", "invalid_cursor", http.StatusUnprocessableEntity},
		{"cursor=" + forge(`not json`), "invalid_cursor", http.StatusUnprocessableEntity},
		{"cursor=" + forge(`{"v":2,"scope":"user:u1","after":"`+fmt.Sprint(after)+`"}`), "invalid_cursor", http.StatusUnprocessableEntity},
		{"cursor=" + forge(`{"v":1,"scope":"user:u1"}`), "invalid_cursor", http.StatusUnprocessableEntity},
		{"cursor=" + forge(`{"v":1,"scope":"user:u1","after":"42"}`), "invalid_cursor", http.StatusUnprocessableEntity},
		{"cursor=" + url.QueryEscape(next) + "&status=CREATED", "invalid_cursor", http.StatusUnprocessableEntity}, // a cursor of the unfiltered listing
		{"user_id=%3Cscript%3E", "invalid_user_id", http.StatusBadRequest},
		{"limit=5&limit=6", "repeated_parameter", http.StatusBadRequest},
		{"offset=20", "unknown_parameter", http.StatusBadRequest},
	} {
		code, b, _ := ts.do(t, http.MethodGet, "/orders?"+tc.query, "u1", "")
		var e struct {
			Error api.Error `json:"error"`
		}
		if code != tc.status || json.Unmarshal(b, &e) != nil || e.Error.Code != tc.code || e.Error.Message == "" {
			t.Errorf("GET /orders?%s: %d %s, want %d %s", tc.query, code, b, tc.status, tc.code)
		}
	}
	if code, b, _ := ts.do(t, http.MethodGet, "/orders", "", ""); code != http.StatusUnauthorized {
		t.Errorf("GET /orders without a key: %d %s", code, b)
	}
	// The good cursor still works, and the last page has none.
	if p := list(t, ts, "u1", "limit=1&cursor="+url.QueryEscape(next)); len(p.Orders) != 1 || p.NextCursor != "" {
		t.Errorf("second page: %+v", p)
	}
}
