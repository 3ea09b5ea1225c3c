// Package api is the saga's front door: it takes orders over HTTP and answers
// what became of them. It writes an order, its items and its OrderCreated
// event in one transaction (no dual write), and reads order status from the
// Redis cache when it can, PostgreSQL otherwise.
package api

import (
	"context"
	_ "embed" // the OpenAPI document
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"

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

// API serves the HTTP endpoints.
type API struct {
	log     *slog.Logger
	pool    *pgxpool.Pool
	rdb     rueidis.Client
	cache   *statuscache.Cache
	prefix  string
	topic   string
	writer  *writer
	auth    AuthConfig
	limits  *limiter
	live    *hub
	keys    *keyCache     // nil: every request's key is looked up
	demoKey string        // shown on the live page while active
	stop    chan struct{} // closed to end every live stream
	once    sync.Once
}

// New returns the api participant. Redis keys go under prefix; events go to
// topic through the outbox.
func New(log *slog.Logger, pool *pgxpool.Pool, rdb rueidis.Client, prefix, topic string, auth AuthConfig) *API {
	a := &API{log: log, pool: pool, rdb: rdb, cache: statuscache.New(rdb, prefix), prefix: prefix, topic: topic,
		writer: newWriter(pool, topic), auth: auth, limits: newLimiter(auth.Rate, auth.Burst),
		live: newHub(), demoKey: auth.DemoKey, stop: make(chan struct{})}
	if auth.KeyCacheTTL > 0 && !auth.Disabled {
		a.keys = newKeyCache(auth.KeyCacheTTL)
	}
	return a
}

// CloseStreams ends every live stream, so a server shutdown need not wait
// for pages that never hang up.
func (a *API) CloseStreams() { a.once.Do(func() { close(a.stop) }) }

// Run writes submitted orders and follows key revocations until ctx ends;
// POST /orders needs it running. Stop it only after the HTTP server has
// stopped taking requests.
func (a *API) Run(ctx context.Context) error {
	done := make(chan struct{})
	go func() { defer close(done); a.keys.listen(ctx, a.pool, a.log) }()
	a.writer.run(ctx)
	<-done
	return nil
}

// Register adds the API's routes to e.
func (a *API) Register(e *echo.Echo) {
	orders := e.Group("/orders", a.authenticate)
	orders.POST("", a.createOrder)
	orders.GET("/:id", a.getOrder)
	orders.GET("/:id/events", a.orderEvents)
	e.GET("/products", a.products) // the catalogue is public
	e.GET("/live", a.livePage)     // the page asks for a key itself
	e.GET("/live/stream", a.liveStream, a.authenticate)
	e.GET("/openapi.json", func(c echo.Context) error {
		return c.Blob(http.StatusOK, echo.MIMEApplicationJSON, OpenAPI)
	})
	e.GET("/", func(c echo.Context) error {
		return c.JSON(http.StatusOK, map[string]any{
			"service": "prozess",
			"endpoints": []string{"POST /orders", "GET /orders/{id}", "GET /orders/{id}/events", "GET /products",
				"GET /live", "GET /live/stream", "GET /openapi.json", "GET /metrics"},
		})
	})
}

// OpenAPI is the OpenAPI 3 document of the HTTP API, served at
// /openapi.json; a contract test checks real responses against it.
//
//go:embed openapi.json
var OpenAPI []byte
