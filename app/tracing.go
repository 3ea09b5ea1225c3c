package app

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/plugin/kotel"
	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/prozess/prozess/modules/event"
)

// Tracing follows one order as one trace: the api's request span, then, for
// every event, the relay's publish span and the handling span of each
// participant that acts on it, whose context the events it emits carry on.
// The context crosses Kafka in W3C traceparent/tracestate record headers
// (franz-go's kotel hooks) and crosses the outbox inside those headers, so a
// crash between commit and publish does not break the trace.
//
// A nil *Tracing is tracing off: no hooks, no spans, nothing injected.
type Tracing struct {
	provider trace.TracerProvider
	tracer   trace.Tracer
	prop     propagation.TextMapPropagator
}

// tracingFromEnv builds tracing from the standard OTEL_ variables: on when
// OTEL_TRACES_EXPORTER names an exporter or an OTLP endpoint is set, off
// (nil, and free) otherwise or when OTEL_SDK_DISABLED=true. The exporter,
// protocol, sampler and resource are the SDK's to read from the environment.
// The returned func flushes and stops the exporter.
//
// The service is named for the participants it runs (prozess for all of
// them, prozess-payment for one), unless OTEL_SERVICE_NAME says otherwise.
func tracingFromEnv(ctx context.Context, participants []string) (*Tracing, func(), error) {
	if !tracingWanted(os.Getenv) {
		return nil, func() {}, nil
	}
	exp, err := autoexport.NewSpanExporter(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("OTEL_TRACES_EXPORTER: %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName(serviceName(participants))),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
		resource.WithTelemetrySDK(),
		resource.WithHost(),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("OTEL_RESOURCE_ATTRIBUTES: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	stop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = tp.Shutdown(ctx)
	}
	return NewTracing(tp), stop, nil
}

func serviceName(participants []string) string {
	if len(participants) == 0 || len(participants) == len(Participants()) {
		return "prozess"
	}
	return "prozess-" + strings.Join(participants, "-")
}

func tracingWanted(getenv func(string) string) bool {
	if strings.EqualFold(getenv("OTEL_SDK_DISABLED"), "true") {
		return false
	}
	if e := getenv("OTEL_TRACES_EXPORTER"); e != "" {
		return e != "none"
	}
	return getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// NewTracing traces with tp (tests give one exporting to memory).
func NewTracing(tp trace.TracerProvider) *Tracing {
	return &Tracing{
		provider: tp,
		tracer:   tp.Tracer("github.com/prozess/prozess"),
		// W3C trace context only (traceparent, tracestate): the format of
		// kotel and of CloudEvents' distributed tracing extension. It rides
		// in the record headers, and so through the outbox.
		prop: propagation.TraceContext{},
	}
}

// publishHooks gives the relay's client kotel's publish spans, which
// inject their context into each record's headers.
//
// Consumers get no receive hooks: every participant fetches every record,
// so kotel's receive spans would add one span per record per participant,
// most of them for records the participant skips (16 per order where 7
// are handled) and telling a reader nothing. The handling span is parented
// on the publish span directly, from the same headers. (Dropping them did
// not move the measured knee; see docs/PERFORMANCE.md.)
func (t *Tracing) publishHooks(clientID string) []kgo.Opt {
	if t == nil {
		return nil
	}
	tracer := kotel.NewTracer(kotel.TracerProvider(t.provider), kotel.TracerPropagator(t.prop), kotel.ClientID(clientID))
	return []kgo.Opt{kgo.WithHooks(kotel.NewKotel(kotel.WithTracer(tracer)).Hooks()...)}
}

// continueFromHeaders points a record at the span its headers name: for
// the relay, so the publish span joins the order's trace; for a consumer,
// so the handling span is the publish span's child.
func (t *Tracing) continueFromHeaders(ctx context.Context, r *kgo.Record) {
	if t == nil {
		return
	}
	r.Context = t.prop.Extract(ctx, kotel.NewRecordCarrier(r))
}

// participantTracer starts a participant's handling spans.
type participantTracer struct {
	t           *Tracing
	kotel       *kotel.Tracer
	participant string
}

// forParticipant returns the tracer for participant's consumer; nil (no
// spans) when tracing is off.
func (t *Tracing) forParticipant(participant string) *participantTracer {
	if t == nil {
		return nil
	}
	k := kotel.NewTracer(kotel.TracerProvider(t.provider), kotel.TracerPropagator(t.prop),
		kotel.ClientID("prozess-"+participant), kotel.ConsumerGroup(groupName(participant)))
	return &participantTracer{t: t, kotel: k, participant: participant}
}

// handleSpans starts one span per record the participant handles, as a
// child of the publish span its headers name, and returns each order's span
// context (for the events it emits and for log lines about it) and a func
// ending them.
func (pt *participantTracer) handleSpans(recs []*kgo.Record, b *batch) (map[string]context.Context, func(error)) {
	if pt == nil {
		return nil, func(error) {}
	}
	byOrder := map[string]context.Context{}
	var spans []trace.Span
	for i, r := range recs {
		if b.skip[i] {
			continue
		}
		pt.t.continueFromHeaders(context.Background(), r)
		ctx, span := pt.kotel.WithProcessSpan(r)
		typ := recordType(r)
		span.SetName(pt.participant + " handle " + string(typ))
		span.SetAttributes(attribute.String("prozess.participant", pt.participant), attribute.String("prozess.event.type", string(typ)))
		if _, bad := b.poison[i]; !bad {
			id := b.evs[i].OrderID.String()
			span.SetAttributes(attribute.String("prozess.order_id", id))
			byOrder[id] = ctx
		}
		spans = append(spans, span)
	}
	return byOrder, func(err error) {
		for _, s := range spans {
			if err != nil {
				s.SetStatus(codes.Error, err.Error())
			}
			s.End()
		}
	}
}

// httpMiddleware gives every api request a server span, continuing the
// caller's trace when the request carries a traceparent header.
func (t *Tracing) httpMiddleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		req := c.Request()
		ctx := t.prop.Extract(req.Context(), propagation.HeaderCarrier(req.Header))
		route := c.Path()
		if route == "" {
			route = "unmatched"
		}
		ctx, span := t.tracer.Start(ctx, req.Method+" "+route, trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(semconv.HTTPRequestMethodKey.String(req.Method), semconv.HTTPRoute(route)))
		defer span.End()
		c.SetRequest(req.WithContext(ctx))
		err := next(c)
		if err != nil {
			c.Error(err) // answer now, so the span knows the code
		}
		code := c.Response().Status
		span.SetAttributes(semconv.HTTPResponseStatusCode(code))
		if code >= 500 {
			span.SetStatus(codes.Error, "")
		}
		return nil
	}
}

// orderTracesKey holds, in a batch's context, each order's span context, so
// a log line naming an order_id gets that order's trace id.
type orderTracesKey struct{}

func withOrderTraces(ctx context.Context, m map[string]context.Context) context.Context {
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

// eventTrace sets, on each emitted event, the trace context of the span that
// handled its order.
func eventTrace(evs []event.Event, byOrder map[string]context.Context) {
	if len(byOrder) == 0 {
		return
	}
	for i := range evs {
		if ctx, ok := byOrder[evs[i].OrderID.String()]; ok {
			evs[i].Trace = event.TraceOf(ctx)
		}
	}
}
