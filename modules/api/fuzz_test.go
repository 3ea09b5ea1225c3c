package api

import (
	"bytes"
	"errors"
	"testing"

	"github.com/prozess/prozess/modules/event"
)

// FuzzDecodeCreate feeds arbitrary bodies to POST /orders' decoder: it must
// never panic, refuse with a 4xx error, or accept only what the rest of the
// saga can rely on.
func FuzzDecodeCreate(f *testing.F) {
	for _, s := range []string{
		`{"user_id":"u1","items":[{"product_id":"prod-mouse","qty":2}]}`,
		`{"items":[{"product_id":"p","qty":1},{"product_id":"q","qty":1000}]}`,
		`{"items":[{"product_id":"p","qty":1},{"product_id":"p","qty":999},{"product_id":"p","qty":1}]}`,
		`{"user_id":"","items":[{"product_id":"p","qty":1}]}`,
		`{"user_id":"u1","items":[{"product_id":"p","qty":0}]}`,
		`{"user_id":"u1","items":[{"product_id":"p","qty":1}],"admin":true}`,
		`{"user_id":"<script>","items":[]}`,
		`{"user_id":"u1","items":[{"product_id":"p","qty":1e3}]}`,
		`{"user_id":"u1","items":[{"product_id":"p","qty":1}]} trailing`,
		`[]`, `null`, ``, `{`, `{"items":null}`, "\x00\xff",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := decodeCreate(bytes.NewReader(body))
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Status < 400 || e.Status >= 500 || e.Code == "" || e.Message == "" {
				t.Fatalf("decode error %v is not a 4xx API error", err)
			}
			return
		}
		if req.UserID != "" && !userIDPattern.MatchString(req.UserID) {
			t.Fatalf("accepted user_id %q", req.UserID)
		}
		if err := event.ValidateItems(req.Items); err != nil {
			t.Fatalf("accepted items the events refuse: %v", err)
		}
		seen := map[string]bool{}
		for _, it := range req.Items {
			if seen[it.ProductID] {
				t.Fatalf("accepted %q twice", it.ProductID)
			}
			seen[it.ProductID] = true
		}
		if len(req.hash()) != 32 {
			t.Fatal("hash is not SHA-256")
		}
	})
}
