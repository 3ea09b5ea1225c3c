package api

import (
	"context"
	"crypto/sha256"
	"math"
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
		p, ok, err := a.principalFor(c.Request().Context(), strings.TrimSpace(key))
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

// principalFor resolves a key from the cache, else from PostgreSQL.
func (a *API) principalFor(ctx context.Context, key string) (Principal, bool, error) {
	if !validKey(key) {
		return Principal{}, false, nil
	}
	h := sha256.Sum256([]byte(key))
	if p, ok := a.keys.get(h); ok {
		return p, true, nil
	}
	gen := a.keys.begin()
	p, ok, err := lookupKey(ctx, a.pool, h[:])
	if ok {
		a.keys.put(gen, h, p)
	}
	return p, ok, err
}

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
	l.mu.Lock()
	lim, ok := l.keys[key]
	if !ok {
		lim = rate.NewLimiter(l.rate, l.burst)
		l.keys[key] = lim
	}
	l.mu.Unlock()
	r := lim.Reserve()
	if d := r.Delay(); d > 0 {
		r.Cancel()
		return d
	}
	return 0
}

// canRead reports whether p may see an order of user: its owner or an admin.
// Anyone else gets 404, not 403, so order ids reveal nothing.
func canRead(p Principal, user string) bool { return p.Admin || p.UserID == user }
