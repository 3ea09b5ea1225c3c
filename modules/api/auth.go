package api

import (
	"context"
	"crypto/sha256"
	"errors"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/labstack/echo/v4"
	"golang.org/x/time/rate"
)

// AuthConfig says how requests are authenticated and limited.
type AuthConfig struct {
	// Disabled turns authentication off, for local use only: every request
	// may act as any user_id it names and read every order.
	Disabled bool
	// Rate and Burst limit each key's requests (token bucket); over the
	// limit a request gets 429 with Retry-After.
	Rate  float64
	Burst int
	// DemoKey, when set, is the public demo key, still active; the live
	// page offers it so a newcomer can place an order at once.
	DemoKey string
	// KeyCacheTTL, when positive, caches valid keys in the process for at
	// most that long; RevokeKey's notification drops a key at once. Zero
	// looks every request's key up in PostgreSQL.
	KeyCacheTTL time.Duration
	// FailRate and FailBurst bound failed authentications per client
	// address (token bucket): past them, a key not already known to this
	// process gets 429 with Retry-After before any database lookup, so
	// guessing keys, or flooding with key-shaped strings, costs at most
	// FailBurst + FailRate lookups a second per address. Zero FailRate: no
	// bound.
	FailRate  float64
	FailBurst int
}

const principalKey = "prozess.principal"

func principal(c echo.Context) Principal {
	p, _ := c.Get(principalKey).(Principal)
	return p
}

var errUnauthorized = &Error{Status: http.StatusUnauthorized, Code: "unauthorized",
	Message: "a valid API key is required: Authorization: Bearer KEY"}

// authenticate resolves the request's API key to a principal, or refuses
// it with 401, and applies the key's rate limit.
func (a *API) authenticate(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if a.auth.Disabled {
			c.Set(principalKey, Principal{Admin: true})
			return next(c)
		}
		key, ok := strings.CutPrefix(c.Request().Header.Get("Authorization"), "Bearer ")
		if !ok {
			c.Response().Header().Set("WWW-Authenticate", `Bearer realm="prozess"`)
			return errUnauthorized
		}
		addr := clientAddr(c)
		p, ok, err := a.principalFor(c.Request().Context(), strings.TrimSpace(key), addr)
		var wait *waitError
		if errors.As(err, &wait) {
			c.Response().Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.d.Seconds()))))
			return &Error{Status: http.StatusTooManyRequests, Code: "too_many_failed_authentications",
				Message: "too many failed authentications from this address; retry after the Retry-After seconds"}
		}
		if err != nil {
			return err
		}
		if !ok {
			c.Response().Header().Set("WWW-Authenticate", `Bearer realm="prozess", error="invalid_token"`)
			return errUnauthorized
		}
		if wait := a.limits.take(p.KeyID); wait > 0 {
			c.Response().Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
			return &Error{Status: http.StatusTooManyRequests, Code: "rate_limited",
				Message: "too many requests for this API key; retry after the Retry-After seconds"}
		}
		c.Set(principalKey, p)
		return next(c)
	}
}

// waitError is principalFor's answer for an address out of failed
// authentications: nothing was looked up.
type waitError struct{ d time.Duration }

func (e *waitError) Error() string { return "too many failed authentications" }

// principalFor resolves a key from the cache, else, while addr may still
// fail, from PostgreSQL.
func (a *API) principalFor(ctx context.Context, key, addr string) (Principal, bool, error) {
	if !validKey(key) {
		return Principal{}, false, nil
	}
	h := sha256.Sum256([]byte(key))
	if p, ok := a.keys.get(h); ok {
		return p, true, nil
	}
	// Concurrent requests with one key share one lookup (a client's first
	// burst costs one lookup, not one each). A lookup spends one of addr's
	// failure tokens up front, so concurrent guesses cannot all pass a
	// check before any spends, and a lookup that finds the key gives it
	// back.
	type found struct {
		p  Principal
		ok bool
	}
	v, err, _ := a.lookupGroup.Do(string(h[:]), func() (any, error) {
		if d := a.failures.take(addr); d > 0 {
			return nil, &waitError{d: d}
		}
		gen := a.keys.begin()
		a.lookups.Add(1)
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dbTimeout) // shared: no one caller's cancel
		defer cancel()
		p, ok, err := lookupKey(lctx, a.pool, h[:])
		if ok || err != nil {
			a.failures.refund(addr)
		}
		if ok {
			a.keys.put(gen, h, p)
		}
		return found{p, ok}, err
	})
	if err != nil {
		return Principal{}, false, err
	}
	f := v.(found)
	return f.p, f.ok, nil
}

// clientAddr is the address a request came from: the connection's peer,
// never a header a client could set, unless the server's IPExtractor says
// otherwise (app's --trusted-proxies: behind an ingress every client would
// otherwise share the ingress's budget).
func clientAddr(c echo.Context) string {
	if c.Echo().IPExtractor != nil {
		return c.RealIP()
	}
	r := c.Request()
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// maxLimited bounds a limiter's buckets; past it, it starts over.
const maxLimited = 100_000

// limiter keeps one token bucket per key.
type limiter struct {
	rate  rate.Limit
	burst int
	mu    sync.Mutex
	keys  map[string]*rate.Limiter
}

func newLimiter(perSecond float64, burst int) *limiter {
	if perSecond <= 0 {
		return &limiter{rate: rate.Inf}
	}
	return &limiter{rate: rate.Limit(perSecond), burst: max(burst, 1), keys: map[string]*rate.Limiter{}}
}

// take spends one token of key's bucket and returns how long to wait when
// there is none (0 when the request may go ahead).
func (l *limiter) take(key string) time.Duration {
	if l.rate == rate.Inf {
		return 0
	}
	r := l.bucket(key).Reserve()
	if d := r.Delay(); d > 0 {
		r.Cancel()
		return d
	}
	return 0
}

func (l *limiter) bucket(key string) *rate.Limiter {
	l.mu.Lock()
	defer l.mu.Unlock()
	lim, ok := l.keys[key]
	if !ok {
		if len(l.keys) >= maxLimited {
			l.keys = map[string]*rate.Limiter{}
		}
		lim = rate.NewLimiter(l.rate, l.burst)
		l.keys[key] = lim
	}
	return lim
}

// failBudget is a token bucket per client address whose tokens can be
// given back: a lookup takes one before it runs and returns it when the
// key was good, so only failures spend the budget, however the lookups
// interleave (rate.Reservation.Cancel restores less once later
// reservations exist).
type failBudget struct {
	rate  float64 // tokens per second; 0: no bound
	burst float64
	mu    sync.Mutex
	addrs map[string]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

func newFailBudget(perSecond float64, burst int) *failBudget {
	return &failBudget{rate: perSecond, burst: float64(max(burst, 1)), addrs: map[string]*bucket{}}
}

// take spends a token of addr's, or returns how long until one is there.
func (f *failBudget) take(addr string) time.Duration {
	if f.rate <= 0 {
		return 0
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	b, ok := f.addrs[addr]
	if !ok {
		if len(f.addrs) >= maxLimited {
			f.addrs = map[string]*bucket{}
		}
		b = &bucket{tokens: f.burst, at: now}
		f.addrs[addr] = b
	}
	b.tokens = min(f.burst, b.tokens+now.Sub(b.at).Seconds()*f.rate)
	b.at = now
	if b.tokens < 1 {
		return time.Duration((1 - b.tokens) / f.rate * float64(time.Second))
	}
	b.tokens--
	return 0
}

// refund gives addr's token back.
func (f *failBudget) refund(addr string) {
	if f.rate <= 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if b, ok := f.addrs[addr]; ok {
		b.tokens = min(f.burst, b.tokens+1)
	}
}

// canRead reports whether p may see an order of user: its owner or an admin.
// Anyone else gets 404, not 403, so order ids reveal nothing.
func canRead(p Principal, user string) bool { return p.Admin || p.UserID == user }
