package api_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/api"
)

// Flooding the api with random key-shaped strings from one address costs
// at most the failure budget in PostgreSQL lookups: FailBurst at once and
// FailRate a second; the rest get 429 with Retry-After before any lookup.
// A key this process already knows (cached) keeps working meanwhile.
func TestFailedAuthenticationsAreBoundedPerAddress(t *testing.T) {
	ts := serverWith(t, api.AuthConfig{Rate: 1e6, Burst: 1e6, FailRate: 5, FailBurst: 10, KeyCacheTTL: time.Minute})
	// Known before the flood: cached once the api follows revocations
	// (it caches nothing before), so a request costs no lookup.
	for deadline := time.Now().Add(10 * time.Second); ; {
		n := ts.api.KeyLookups()
		if code, b, _ := ts.do(t, http.MethodGet, "/orders/00000000-0000-0000-0000-000000000000", "u1", ""); code != http.StatusNotFound {
			t.Fatalf("a valid key before the flood: %d %s", code, b)
		}
		if ts.api.KeyLookups() == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the valid key is still looked up every time after 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	before := ts.api.KeyLookups()
	start := time.Now()
	var unauthorized, limited, retryAfter atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				raw := make([]byte, 32)
				_, _ = rand.Read(raw)
				req, _ := http.NewRequest(http.MethodGet, ts.URL+"/orders/00000000-0000-0000-0000-000000000000", nil)
				req.Header.Set("Authorization", "Bearer pz_kguess_"+hex.EncodeToString(raw))
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				resp.Body.Close()
				switch resp.StatusCode {
				case http.StatusUnauthorized:
					unauthorized.Add(1)
				case http.StatusTooManyRequests:
					limited.Add(1)
					if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s >= 1 {
						retryAfter.Add(1)
					}
				default:
					t.Errorf("a guessed key: %d", resp.StatusCode)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	lookups := ts.api.KeyLookups() - before
	bound := 10 + int64(5*elapsed.Seconds()) + 1
	t.Logf("800 guesses in %s: %d lookups (bound %d), %d answered 401, %d answered 429", elapsed.Round(time.Millisecond), lookups, bound,
		unauthorized.Load(), limited.Load())
	if lookups > bound {
		t.Fatalf("%d key lookups for 800 guesses in %s, want at most %d", lookups, elapsed, bound)
	}
	if unauthorized.Load() != lookups || limited.Load() != 800-lookups || retryAfter.Load() != limited.Load() {
		t.Fatalf("401s %d (want one per lookup, %d), 429s %d with Retry-After %d", unauthorized.Load(), lookups, limited.Load(), retryAfter.Load())
	}
	// The cached valid key still works from the flooded address.
	if code, b, _ := ts.do(t, http.MethodGet, "/orders/00000000-0000-0000-0000-000000000000", "u1", ""); code != http.StatusNotFound {
		t.Fatalf("a known key during the flood: %d %s", code, b)
	}
}

// Revoking a key ends its open live streams within a second: an admin
// key's stream shows every order and dead letter.
func TestRevokingAKeyEndsItsStreams(t *testing.T) {
	ts := server(t)
	id, key, err := api.CreateKey(t.Context(), ts.pool, "ops", true)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	open := func(k string) *bufio.Reader {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ts.URL+"/live/stream", nil)
		req.Header.Set("Authorization", "Bearer "+k)
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("opening a stream: %v %v", resp, err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return bufio.NewReader(resp.Body)
	}
	revoked, other := open(key), open(ts.keys["u1"])
	ended := make(chan time.Time, 1)
	go func() {
		for {
			if _, err := revoked.ReadString('\n'); err != nil {
				ended <- time.Now()
				return
			}
		}
	}()
	time.Sleep(200 * time.Millisecond) // both streams past their snapshot
	at := time.Now()
	if err := api.RevokeKey(t.Context(), ts.pool, id); err != nil {
		t.Fatal(err)
	}
	select {
	case end := <-ended:
		t.Logf("the revoked key's stream ended %s after the revocation", end.Sub(at).Round(time.Millisecond))
	case <-time.After(time.Second):
		t.Fatal("the revoked key's stream is still open a second after the revocation")
	}
	// Another key's stream stays open.
	line := make(chan error, 1)
	go func() {
		for {
			if _, err := other.ReadString('\n'); err != nil {
				line <- err
				return
			}
		}
	}()
	select {
	case err := <-line:
		t.Fatalf("another key's stream ended too: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if code, _, _ := ts.do(t, http.MethodGet, "/live/stream", "", ""); code != http.StatusUnauthorized {
		t.Fatalf("no key: %d", code)
	}
}

// A client's first burst with a valid key is not a flood of failures: 60
// concurrent requests share one lookup, and none gets 429. The lookup is
// held up (api_keys locked) until all 60 requests are on the server, so
// "concurrent" is certain; without the shared lookup each would take one,
// and the failure budget (2) would refuse most of them.
func TestFirstBurstWithAValidKeyIsOneLookup(t *testing.T) {
	ts := serverWith(t, api.AuthConfig{Rate: 1e6, Burst: 1e6, FailRate: 1, FailBurst: 2})
	before := ts.api.KeyLookups()
	tx, err := ts.pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(t.Context(), `LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	const n = 60
	var wg sync.WaitGroup
	var bad, sent atomic.Int64
	trace := &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { sent.Add(1) }}
	for range n {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(t.Context(), trace), http.MethodGet,
				ts.URL+"/orders/00000000-0000-0000-0000-000000000000", nil)
			req.Header.Set("Authorization", "Bearer "+ts.keys["u1"])
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				bad.Add(1)
				return
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound {
				bad.Add(1)
			}
		})
	}
	for deadline := time.Now().Add(30 * time.Second); sent.Load() < n; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d requests sent in 30s", sent.Load(), n)
		}
	}
	time.Sleep(time.Second) // for the server to take the last ones in
	held := ts.api.KeyLookups() - before
	if err := tx.Rollback(t.Context()); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	lookups := ts.api.KeyLookups() - before
	t.Logf("%d concurrent requests with one key: %d lookups (%d while the first was held up)", n, lookups, held)
	if bad.Load() > 0 {
		t.Fatalf("%d of %d requests with a valid key were refused", bad.Load(), n)
	}
	if lookups != 1 {
		t.Fatalf("%d lookups for %d concurrent requests with one key, want 1", lookups, n)
	}
}
