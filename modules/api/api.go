// Package api is the saga's front door: it takes orders over HTTP and answers
// what became of them. It writes an order, its items and its OrderCreated
// event in one transaction (no dual write), and reads order status from the
// Redis cache when it can, PostgreSQL otherwise.
package api

import (
	"context"
	_ "embed" // the OpenAPI document
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"golang.org/x/sync/singleflight"

	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
)

// Name is the participant's name and its event source.
const Name = "api"

// MaxBodyBytes bounds a request body; larger ones get 413.
const MaxBodyBytes = 64 << 10

// idempotencyTTL is how long Redis remembers an Idempotency-Key. PostgreSQL
// remembers it for as long as the order exists.
const idempotencyTTL = 24 * time.Hour

// redisTimeout bounds every Redis call on the request path: Redis is a fast
// path only, so when it is slow or down a request goes on without it
// instead of waiting.
const redisTimeout = 150 * time.Millisecond

// dbTimeout bounds the PostgreSQL work of one request (dbBound). A request
// the database cannot serve by then is answered 503 with Retry-After, so a
// hung PostgreSQL (its process stopped: connections open, nothing
// answering; or a lock held by a stuck transaction) costs a client 5 s,
// not a connection held until the server resumes, and the pool is not
// drained by requests nobody waits for. The group commit's own batches
// are bounded at 30 s; one whose client was answered 503 may still commit,
// which is what the Idempotency-Key is for.
const dbTimeout = 5 * time.Second

// API serves the HTTP endpoints.
type API struct {
	log    *slog.Logger
	pool   *pgxpool.Pool
	rdb    rueidis.Client
	cache  *statuscache.Cache
	prefix string
	topic  string
	writer *writer
	auth   AuthConfig
	limits *limiter
	// failures bounds failed authentications per client address;
	// lookups counts the key lookups that reached PostgreSQL.
	failures    *failBudget
	lookups     atomic.Int64
	lookupGroup singleflight.Group // one lookup per key at a time
	live        *hub
	keys        *keyCache     // nil: every request's key is looked up
	demoKey     string        // shown on the live page while active
	stop        chan struct{} // closed to end every live stream
	once        sync.Once

	sagaDeadline time.Duration
	replayGuard  func(ctx context.Context, age time.Duration) error
	committed    func() // see Config.OutboxCommitted; may be nil
	participants []string
}

// Config is what the api needs beyond its clients.
type Config struct {
	Prefix string // Redis keys' prefix (bound to the database: statuscache.BoundPrefix)
	Topic  string // where OrderCreated goes, through the outbox
	Auth   AuthConfig
	// SagaDeadline is --saga-deadline: the live page counts the paid
	// orders older than it that have not shipped (0: not counted).
	SagaDeadline time.Duration
	// ReplayGuard, when set, may refuse an admin's re-drive of a dead
	// letter by the event's age (the inboxes' retention; see
	// deadletter.Redrive and deadletter.TooOld).
	ReplayGuard func(ctx context.Context, age time.Duration) error
	// OutboxCommitted, when set, is called after a transaction that wrote
	// to the outbox has committed, to wake the relay.
	OutboxCommitted func()
	// Participants are the names a bulk re-drive's filter may give as
	// its participant (empty: any).
	Participants []string
}

// New returns the api participant.
func New(log *slog.Logger, pool *pgxpool.Pool, rdb rueidis.Client, cfg Config) *API {
	auth := cfg.Auth
	a := &API{log: log, pool: pool, rdb: rdb, cache: statuscache.New(rdb, cfg.Prefix), prefix: cfg.Prefix, topic: cfg.Topic,
		writer: newWriter(pool, cfg.Topic, cfg.OutboxCommitted), auth: auth, limits: newLimiter(auth.Rate, auth.Burst),
		failures: newFailBudget(auth.FailRate, auth.FailBurst),
		live:     newHub(), demoKey: auth.DemoKey, stop: make(chan struct{}), sagaDeadline: cfg.SagaDeadline, replayGuard: cfg.ReplayGuard,
		committed: cfg.OutboxCommitted, participants: cfg.Participants}
	if auth.KeyCacheTTL > 0 && !auth.Disabled {
		a.keys = newKeyCache(auth.KeyCacheTTL)
	}
	return a
}

// KeyLookups is how many API key lookups reached PostgreSQL.
func (a *API) KeyLookups() int64 { return a.lookups.Load() }

// CloseStreams ends every live stream, so a server shutdown need not wait
// for pages that never hang up.
func (a *API) CloseStreams() { a.once.Do(func() { close(a.stop) }) }

// Run writes submitted orders and follows key revocations until ctx ends;
// POST /orders needs it running. Stop it only after the HTTP server has
// stopped taking requests.
func (a *API) Run(ctx context.Context) error {
	done := make(chan struct{})
	go func() { defer close(done); a.followRevocations(ctx) }()
	a.writer.run(ctx)
	<-done
	return nil
}

// Register adds the API's routes to e.
func (a *API) Register(e *echo.Echo) {
	// Each route names its middleware itself: an echo group with
	// middleware catches every method on its paths (to run that
	// middleware), so TRACE /orders was answered 404 where the router
	// answers 405 with Allow.
	bound := []echo.MiddlewareFunc{a.dbBound, a.authenticate}
	e.POST("/orders", a.createOrder, bound...)
	e.GET("/orders", a.listOrders, bound...)
	e.GET("/orders/:id", a.getOrder, bound...)
	e.GET("/orders/:id/events", a.orderEvents, bound...)
	e.POST("/orders/:id/cancel", a.cancelOrder, bound...)
	e.GET("/products", a.products, a.dbBound) // the catalogue is public
	e.GET("/live", a.livePage)                // the page asks for a key itself
	e.GET("/live/stream", a.liveStream, a.streamBound, a.authenticate)
	e.POST("/admin/dead-letters/:id/replay", a.redrive, a.dbBound, a.authenticate)
	e.POST("/admin/parked/:id/replay", a.unpark, a.dbBound, a.authenticate)
	e.POST("/admin/dead-letters/replay", a.redriveMatching, a.dbBound, a.authenticate)
	e.POST("/admin/parked/replay", a.unparkMatching, a.dbBound, a.authenticate)
	e.GET("/openapi.json", func(c echo.Context) error {
		return c.Blob(http.StatusOK, echo.MIMEApplicationJSON, OpenAPI)
	})
	asyncAPI := event.AsyncAPIFor(a.topic)
	e.GET("/asyncapi.json", func(c echo.Context) error {
		return c.Blob(http.StatusOK, echo.MIMEApplicationJSON, asyncAPI)
	})
	e.GET("/", func(c echo.Context) error {
		return c.JSON(http.StatusOK, map[string]any{
			"service": "prozess",
			"endpoints": []string{"POST /orders", "GET /orders", "GET /orders/{id}", "GET /orders/{id}/events", "POST /orders/{id}/cancel", "GET /products",
				"GET /live", "GET /live/stream", "GET /openapi.json", "GET /asyncapi.json",
				"POST /admin/dead-letters/{id}/replay", "POST /admin/parked/{id}/replay",
				"POST /admin/dead-letters/replay", "POST /admin/parked/replay"},
		})
	})
}

// OpenAPI is the OpenAPI 3 document of the HTTP API, served at
// /openapi.json; a contract test checks real responses against it.
//
//go:embed openapi.json
var OpenAPI []byte

// errDatabaseTimeout answers a request PostgreSQL did not serve within
// dbTimeout.
var errDatabaseTimeout = &Error{Status: http.StatusServiceUnavailable, Code: "unavailable",
	Message: "the database did not answer in time; retry (a POST with the same Idempotency-Key is safe to retry)"}

// streamBound answers 503 as dbBound does when the key lookup or the
// snapshot of a live stream times out; the stream itself lasts, so its
// context has no bound (liveStream bounds its snapshot with dbTimeout).
func (a *API) streamBound(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error { return a.unavailable(c, c.Request().Context(), next(c)) }
}

// dbBound gives a request dbTimeout for its work (the live stream, which
// lasts, goes without), and answers 503 with Retry-After when it runs out.
func (a *API) dbBound(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		ctx, cancel := context.WithTimeout(c.Request().Context(), dbTimeout)
		defer cancel()
		c.SetRequest(c.Request().WithContext(ctx))
		return a.unavailable(c, ctx, next(c))
	}
}

// errDatabaseUnavailable answers a request PostgreSQL did not take: no
// server --database-url names accepts connections, or writes (a failover
// under way), or the server refused the statement as read-only or
// starting up, or the request never left a pooled connection found dead.
// Nothing of it was applied.
var errDatabaseUnavailable = &Error{Status: http.StatusServiceUnavailable, Code: "unavailable",
	Message: "the database is unavailable for the moment and nothing was done; retry (a POST with the same Idempotency-Key is safe to retry)"}

// errDatabaseLost answers a request whose connection to PostgreSQL broke
// while it was under way: the server died, was shut down, or ended the
// session (57P01: also a commit waiting for its synchronous standby,
// which is then committed on the primary). As after a timeout, nothing
// was decided for certain.
var errDatabaseLost = &Error{Status: http.StatusServiceUnavailable, Code: "unavailable",
	Message: "the connection to the database was lost during the request, which may or may not have taken effect; " +
		"retry with the same Idempotency-Key (safe), or look before placing an order sent without one again"}

// unavailable turns err into a 503 with Retry-After when ctx ran out or
// err is a timeout (the key lookup, shared by concurrent requests, has a
// bound of its own: its timeout counts too), or when the database could
// not take the request or its connection broke (databaseDown); any other
// err is returned as it is, a 500 unless it says otherwise. A client that
// retries 503s with its Idempotency-Key, as the API's document says,
// rides out a failover.
func (a *API) unavailable(c echo.Context, ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		a.log.WarnContext(ctx, "database did not answer in time", "method", c.Request().Method, "path", c.Path(), "err", err)
		c.Response().Header().Set("Retry-After", "1")
		return errDatabaseTimeout
	}
	answer := errDatabaseUnavailable
	switch databaseDown(err) {
	case dbUp:
		return err
	case dbLost:
		answer = errDatabaseLost
	}
	a.log.WarnContext(ctx, "database unavailable", "method", c.Request().Method, "path", c.Path(), "err", err)
	c.Response().Header().Set("Retry-After", "1")
	return answer
}

// dbState is what an error says of the database behind a request.
type dbState int

const (
	dbUp      dbState = iota // not the database's state: the request's own error, a bug, a misconfiguration
	dbRefused                // the database did not take the request: nothing was applied
	dbLost                   // the connection broke mid-request: it may have been applied
)

// databaseDown says whether err means PostgreSQL could not serve the
// request, rather than refused it for what it is. Before, these were
// 500s, which a client cannot tell from a bug. What it is not: an error
// the api already answers (*Error), a client gone away, and every SQLSTATE
// but the passing ones: a wrong password (28xxx), a missing database
// (3D000) or a missing grant (42501) answer 500, since no retry mends a
// misconfiguration; nor pgx's "conn busy", which only a bug causes.
func databaseDown(err error) dbState {
	var answered *Error
	if errors.As(err, &answered) || errors.Is(err, context.Canceled) {
		return dbUp
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "25006", pgErr.Code == "57P03", strings.HasPrefix(pgErr.Code, "08"):
			// read-only (a standby, a primary being demoted), starting
			// up, a connection exception: the statement failed.
			return dbRefused
		case pgErr.Code == "57P01", pgErr.Code == "57P02":
			// the session ended (shutdown, crash of another backend)
			return dbLost
		}
		return dbUp
	}
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) {
		return dbRefused // no host of the URL took a connection
	}
	if pgconn.SafeToRetry(err) {
		// Nothing was sent, as on a pooled connection found closed
		// ("conn closed") when the server died.
		if strings.HasSuffix(err.Error(), "conn busy") {
			return dbUp
		}
		return dbRefused
	}
	var netErr net.Error
	if errors.As(err, &netErr) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return dbLost
	}
	return dbUp
}
