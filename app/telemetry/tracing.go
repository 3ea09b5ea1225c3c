package telemetry

import (
	"context"
	"fmt"
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

// TracingFromEnv builds tracing from the standard OTEL_ variables: on when
// OTEL_TRACES_EXPORTER names an exporter or an OTLP endpoint is set, off
// (nil, and free) otherwise or when OTEL_SDK_DISABLED=true. The exporter,
// protocol, sampler and resource are the SDK's to read from the environment.
// The returned func flushes and stops the exporter.
//
// The service is named service unless OTEL_SERVICE_NAME says otherwise.
func TracingFromEnv(ctx context.Context, service string) (*Tracing, func(), error) {
	if !tracingWanted(os.Getenv) {
		return nil, func() {}, nil
	}
	exp, err := autoexport.NewSpanExporter(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("OTEL_TRACES_EXPORTER: %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName(service)),
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

// PublishHooks gives the relay's client kotel's publish spans, which
// inject their context into each record's headers.
//
// Consumers get no receive hooks: every participant fetches every record,
// so kotel's receive spans would add one span per record per participant,
// most of them for records the participant skips (16 per order where 7
// are handled) and telling a reader nothing. The handling span is parented
// on the publish span directly, from the same headers. (Dropping them did
// not move the measured knee; see docs/PERFORMANCE.md.)
func (t *Tracing) PublishHooks(clientID string) []kgo.Opt {
	if t == nil {
		return nil
	}
	tracer := kotel.NewTracer(kotel.TracerProvider(t.provider), kotel.TracerPropagator(t.prop), kotel.ClientID(clientID))
	return []kgo.Opt{kgo.WithHooks(kotel.NewKotel(kotel.WithTracer(tracer)).Hooks()...)}
}

// ContinueFromHeaders points a record at the span its headers name: for
// the relay, so the publish span joins the order's trace; for a consumer,
// so the handling span is the publish span's child.
func (t *Tracing) ContinueFromHeaders(ctx context.Context, r *kgo.Record) {
	if t == nil {
		return
	}
	r.Context = t.prop.Extract(ctx, kotel.NewRecordCarrier(r))
}

// ParticipantTracer starts a participant's handling spans.
type ParticipantTracer struct {
	t           *Tracing
	kotel       *kotel.Tracer
	participant string
}

// ForParticipant returns the tracer for participant's consumer in group;
// nil (no spans) when tracing is off.
func (t *Tracing) ForParticipant(participant, group string) *ParticipantTracer {
	if t == nil {
		return nil
	}
	k := kotel.NewTracer(kotel.TracerProvider(t.provider), kotel.TracerPropagator(t.prop),
		kotel.ClientID("prozess-"+participant), kotel.ConsumerGroup(group))
	return &ParticipantTracer{t: t, kotel: k, participant: participant}
}

// Handled is a record a participant handles: its event type and its order
// id (empty when the record could not be decoded).
type Handled struct {
	Record  *kgo.Record
	Type    string
	OrderID string
}

// HandleSpans starts one span per record the participant handles, as a
// child of the publish span its headers name, and returns each order's span
// context (for the events it emits and for log lines about it) and a func
// ending them.
func (pt *ParticipantTracer) HandleSpans(recs []Handled) (map[string]context.Context, func(error)) {
	if pt == nil {
		return nil, func(error) {}
	}
	byOrder := map[string]context.Context{}
	var spans []trace.Span
	for _, h := range recs {
		pt.t.ContinueFromHeaders(context.Background(), h.Record)
		ctx, span := pt.kotel.WithProcessSpan(h.Record)
		span.SetName(pt.participant + " handle " + h.Type)
		span.SetAttributes(attribute.String("prozess.participant", pt.participant), attribute.String("prozess.event.type", h.Type))
		if h.OrderID != "" {
			span.SetAttributes(attribute.String("prozess.order_id", h.OrderID))
			byOrder[h.OrderID] = ctx
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

// HTTPMiddleware gives every api request a server span, continuing the
// caller's trace when the request carries a traceparent header.
func (t *Tracing) HTTPMiddleware(next echo.HandlerFunc) echo.HandlerFunc {
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
