package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"

	"github.com/prozess/prozess/modules/api"
)

func (s *System) addHTTP(a *api.API) error {
	ln, err := net.Listen("tcp", s.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("--http-addr %s: %w", s.cfg.HTTPAddr, err)
	}
	s.httpAddr = ln.Addr().String()
	e := NewEcho(s.log)
	if s.tracing != nil {
		e.Use(s.tracing.httpMiddleware)
	}
	e.Use(s.metrics.middleware)
	e.GET("/metrics", echo.WrapHandler(s.metrics.Handler()))
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
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			s.log.Warn("http shutdown", "err", err)
		}
	})
	return nil
}

// addPprof serves Go's profiles, for finding where the time goes.
func (s *System) addPprof(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--pprof-addr %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	s.addServer("pprof", ln, mux)
	return nil
}

// NewEcho returns the HTTP router with the API's error format, panic
// recovery, a body limit and request logging.
func NewEcho(log *slog.Logger) *echo.Echo {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
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

// addAdmin serves /metrics, /livez (the process is up) and /readyz (it can
// do its work: database and broker reachable, every consumer in its group)
// for Prometheus and orchestrators.
func (s *System) addAdmin(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--admin-addr %s: %w", addr, err)
	}
	s.adminAddr = ln.Addr().String()
	mux := http.NewServeMux()
	mux.Handle("/metrics", s.metrics.Handler())
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"status":"ok"}` + "\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		w.Header().Set("Content-Type", "application/json")
		if err := s.ready(ctx); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_ = json.NewEncoder(w).Encode(map[string]string{"status": "not ready", "reason": err.Error()})
			return
		}
		_, _ = w.Write([]byte(`{"status":"ready"}` + "\n"))
	})
	s.addServer("admin", ln, mux)
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
