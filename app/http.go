package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
)

func (s *System) addHTTP(a *api.API) error {
	ln, err := net.Listen("tcp", s.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("--http-addr %s: %w", s.cfg.HTTPAddr, err)
	}
	s.httpAddr = ln.Addr().String()
	e := NewEcho(s.log)
	e.IPExtractor = clientIP(s.cfg.TrustedProxies)
	if s.tracing != nil {
		e.Use(s.tracing.HTTPMiddleware)
	}
	e.Use(s.metrics.Middleware)
	// No /metrics here: it publishes business figures and costs queries,
	// so it is served only on --admin-addr, a private port.
	a.Register(e)
	srv := &http.Server{
		Handler: e,
		// Slow clients cannot hold connections: headers and body must
		// arrive in time.
		ReadHeaderTimeout: min(5*time.Second, s.cfg.HTTPReadTimeout),
		ReadTimeout:       s.cfg.HTTPReadTimeout,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	srv.RegisterOnShutdown(a.CloseStreams) // live streams never end by themselves
	shutdown := make(chan struct{})
	s.group.Add(func() error {
		// The order writer outlives the server: requests still in flight
		// during Shutdown get their orders written.
		wctx, stop := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(wctx) }()
		defer func() { stop(); <-done }()
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http server: %w", err)
		}
		<-shutdown // Serve returns at once; Shutdown returns when handlers are done
		return nil
	}, func(error) {
		defer close(shutdown)
		// Not ready first, still serving: a load balancer that probes
		// /readyz takes this instance out before it refuses connections,
		// so a rolling update answers no request with a 502.
		s.draining.Store(true)
		if d := s.cfg.DrainDelay; d > 0 {
			s.log.Info("draining: /readyz fails, requests still served", "for", d)
			time.Sleep(d)
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			s.log.Warn("http shutdown", "err", err)
		}
	})
	return nil
}

// addPprof serves Go's profiles on addr.
func (s *System) addPprof(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--pprof-addr %s: %w", addr, err)
	}
	s.addServer("pprof", ln, telemetry.PprofHandler())
	return nil
}

// NewEcho returns the HTTP router with the API's error format, panic
// recovery, a body limit and request logging.
func NewEcho(log *slog.Logger) *echo.Echo {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.IPExtractor = clientIP(nil)
	e.HTTPErrorHandler = api.ErrorHandler(log)
	e.Use(middleware.Recover())
	e.Use(middleware.BodyLimit(fmt.Sprintf("%dB", api.MaxBodyBytes)))
	e.Use(middleware.RequestLoggerWithConfig(middleware.RequestLoggerConfig{
		LogMethod: true, LogURI: true, LogStatus: true, LogLatency: true, LogError: true,
		LogValuesFunc: func(_ echo.Context, v middleware.RequestLoggerValues) error {
			log.Debug("request", "method", v.Method, "uri", v.URI, "status", v.Status, "latency", v.Latency)
			return nil
		},
	}))
	return e
}

// addAdmin serves the operator endpoints (telemetry.AdminHandler) on addr;
// ready means database and broker reachable, every consumer in its group.
func (s *System) addAdmin(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--admin-addr %s: %w", addr, err)
	}
	s.adminAddr = ln.Addr().String()
	s.addServer("admin", ln, telemetry.AdminHandler(s.metrics, s.ready))
	return nil
}

// addServer runs an operator endpoint (admin, pprof) until the group stops;
// unlike the api, it has no requests worth draining.
func (s *System) addServer(name string, ln net.Listener, h http.Handler) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	s.group.Add(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("%s server: %w", name, err)
		}
		return nil
	}, func(error) { srv.Close() })
}

// addLiveFeed tails the saga topic and its dead letters into the api's live
// streams. Every api process tails for itself: its streams see every event
// whichever process's participants handled it. The Kafka client rides out
// broker outages itself; Tail fails only on a client it cannot create.
func (s *System) addLiveFeed(a *api.API) {
	topic, dlq := s.cfg.Topic, s.cfg.DLQTopic()
	s.addActor(func(ctx context.Context) error {
		return saga.Tail(ctx, s.kafka, []string{topic, dlq}, false, func(r *kgo.Record) {
			if !a.Watched() {
				return // nobody to tell: not even decoded
			}
			if r.Topic == dlq {
				d := saga.ParseDeadLetter(r)
				a.PublishDeadLetter(api.LiveDeadLetter{ID: d.ID, Partition: d.Partition, Offset: d.Offset, Participant: d.Participant,
					Reason: d.Reason, Type: d.Type, OrderID: d.Key, Time: d.At()})
				return
			}
			if ev, err := event.FromRecord(r); err == nil {
				a.Publish(ctx, ev)
			}
		})
	})
}

// clientIP is how the api tells a request's client address (what the
// failed-authentication budget is per): the TCP peer, or, when that peer is
// one of the trusted proxies (--trusted-proxies), the address the proxies
// appended to X-Forwarded-For, read from the right past every trusted hop.
// Echo's extractor trusts loopback and private networks by default; here
// only what the operator named is trusted, since a client can write any
// X-Forwarded-For it likes.
func clientIP(trusted []*net.IPNet) echo.IPExtractor {
	if len(trusted) == 0 {
		return echo.ExtractIPDirect()
	}
	opts := []echo.TrustOption{echo.TrustLoopback(false), echo.TrustLinkLocal(false), echo.TrustPrivateNet(false)}
	for _, n := range trusted {
		opts = append(opts, echo.TrustIPRange(n))
	}
	return echo.ExtractIPFromXFFHeader(opts...)
}
