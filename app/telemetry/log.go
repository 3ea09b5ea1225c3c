package telemetry

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"

	"go.opentelemetry.io/otel/trace"
)

// NewLogger builds the process's one logger, on standard error.
func NewLogger(level, format string) (*slog.Logger, error) {
	return NewLoggerTo(os.Stderr, level, format)
}

// NewLoggerTo is NewLogger writing to w. Lines logged with a context that
// has a span, or naming an order of a traced batch, carry its trace_id.
func NewLoggerTo(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(traceLogHandler{slog.NewTextHandler(w, opts)}), nil
	case "json":
		return slog.New(traceLogHandler{slog.NewJSONHandler(w, opts)}), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// orderTracesKey holds, in a batch's context, each order's span context, so
// a log line naming an order_id gets that order's trace id.
type orderTracesKey struct{}

// WithOrderTraces gives a batch's context each order's span context.
func WithOrderTraces(ctx context.Context, m map[string]context.Context) context.Context {
	if len(m) == 0 {
		return ctx
	}
	return context.WithValue(ctx, orderTracesKey{}, m)
}

// traceLogHandler adds trace_id and span_id to every log record made with a
// context that has a span, and, in a batch's context, to every record
// naming an order_id.
type traceLogHandler struct{ slog.Handler }

func (h traceLogHandler) Handle(ctx context.Context, r slog.Record) error {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		if m, ok := ctx.Value(orderTracesKey{}).(map[string]context.Context); ok {
			r.Attrs(func(a slog.Attr) bool {
				if a.Key == "order_id" {
					if octx, ok := m[a.Value.Resolve().String()]; ok {
						sc = trace.SpanContextFromContext(octx)
					}
					return false
				}
				return true
			})
		}
	}
	if sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return h.Handler.Handle(ctx, r)
}

func (h traceLogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return traceLogHandler{h.Handler.WithAttrs(as)}
}

func (h traceLogHandler) WithGroup(name string) slog.Handler {
	return traceLogHandler{h.Handler.WithGroup(name)}
}
