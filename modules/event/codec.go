package event

import (
	"bytes"
	"context"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// CloudEvents Kafka binding (binary mode) header names.
const (
	hdrSpecVersion   = "ce_specversion"
	hdrID            = "ce_id"
	hdrType          = "ce_type"
	hdrSource        = "ce_source"
	hdrTime          = "ce_time"
	hdrSubject       = "ce_subject"
	hdrSchemaVersion = "ce_schemaversion" // extension attribute: our payload version
	hdrContentType   = "content-type"
	sourcePrefix     = "/prozess/"
)

// SourceName is the participant a ce_source value names ("/prozess/payment"
// is payment); any other value is returned as it is.
func SourceName(ceSource string) string {
	name, _ := strings.CutPrefix(ceSource, sourcePrefix)
	return name
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// Record encodes e as a Kafka record for topic, keyed by order id.
func (e Event) Record(topic string) *kgo.Record {
	r := &kgo.Record{
		Topic: topic,
		Key:   []byte(e.OrderID.String()),
		Value: e.Data,
		Headers: []kgo.RecordHeader{
			{Key: hdrSpecVersion, Value: []byte("1.0")},
			{Key: hdrID, Value: []byte(e.ID.String())},
			{Key: hdrType, Value: []byte(e.Type)},
			{Key: hdrSource, Value: []byte(sourcePrefix + e.Source)},
			{Key: hdrTime, Value: []byte(e.Time.UTC().Format(time.RFC3339Nano))},
			{Key: hdrSubject, Value: []byte(e.OrderID.String())},
			{Key: hdrSchemaVersion, Value: []byte(SchemaVersion)},
			{Key: hdrContentType, Value: []byte("application/json")},
		},
	}
	for _, k := range slices.Sorted(maps.Keys(e.Trace)) {
		r.Headers = append(r.Headers, kgo.RecordHeader{Key: k, Value: []byte(e.Trace[k])})
	}
	return r
}

// TraceOf returns the W3C trace context of ctx's span, for an event to
// carry; nil when ctx has no span (tracing off), which costs nothing.
func TraceOf(ctx context.Context) map[string]string {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return nil
	}
	c := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, c)
	return c
}

// FromRecord decodes and validates a record. Every failure wraps ErrInvalid:
// a record that does not decode now never will, so it is dead-lettered.
func FromRecord(r *kgo.Record) (Event, error) {
	h := make(map[string]string, len(r.Headers))
	for _, kv := range r.Headers {
		h[kv.Key] = string(kv.Value)
	}
	if v := h[hdrSpecVersion]; v != "1.0" {
		return Event{}, invalid("ce_specversion %q, want 1.0", v)
	}
	if major, ok := schemaMajor(h[hdrSchemaVersion]); !ok || major != SchemaMajor {
		return Event{}, invalid("unknown schema version %q (this build reads %d.x)", h[hdrSchemaVersion], SchemaMajor)
	}
	var e Event
	e.Type = Type(h[hdrType])
	if !e.Type.Known() {
		return Event{}, invalid("unknown event type %q", e.Type)
	}
	var err error
	if e.ID, err = uuid.Parse(h[hdrID]); err != nil {
		return Event{}, invalid("ce_id: %v", err)
	}
	if e.OrderID, err = uuid.Parse(string(r.Key)); err != nil {
		return Event{}, invalid("key is not an order id: %v", err)
	}
	if s := h[hdrSubject]; s != "" && s != e.OrderID.String() {
		return Event{}, invalid("ce_subject %q does not match key %q", s, r.Key)
	}
	src, ok := strings.CutPrefix(h[hdrSource], sourcePrefix)
	if !ok || src == "" || len(src) > maxIDLen {
		return Event{}, invalid("ce_source %q", h[hdrSource])
	}
	e.Source = src
	if e.Time, err = time.Parse(time.RFC3339Nano, h[hdrTime]); err != nil {
		return Event{}, invalid("ce_time: %v", err)
	}
	// A time that leaves RFC 3339's years once in UTC (0000-01-01T00:00+01:00
	// is in year -1) could not be written back out; no real event has one.
	if y := e.Time.UTC().Year(); y < 1970 || y > 9999 {
		return Event{}, invalid("ce_time %q is out of range", h[hdrTime])
	}
	if len(r.Value) > MaxPayloadBytes {
		return Event{}, invalid("payload of %d bytes, at most %d", len(r.Value), MaxPayloadBytes)
	}
	e.Data = r.Value
	if err := e.check(); err != nil {
		return Event{}, err
	}
	return e, nil
}

// check decodes the payload into its type's struct, so a participant never
// sees a payload that does not match its type.
func (e Event) check() error {
	var v any
	switch e.Type {
	case OrderCreated:
		v = new(Created)
	case InventoryReserved:
		v = new(Reserved)
	case InventoryFailed, PaymentFailed, ShipmentCancelled:
		v = new(Failed)
	case PaymentCompleted:
		v = new(Paid)
	case InventoryReleased:
		v = new(Released)
	case OrderShipped:
		v = new(Shipped)
	case OrderExpired:
		v = new(Expired)
	case OrderCancelRequested:
		v = new(CancelRequested)
	case PaymentRefunded:
		v = new(Refunded)
	}
	return e.Decode(v)
}
