package event_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/event"
)

func sample(t testing.TB) event.Event {
	t.Helper()
	ev, err := event.New(event.OrderCreated, uuid.New(), "api",
		event.Created{UserID: "u1", Items: []event.Item{{ProductID: "prod-mouse", Qty: 2}}, AmountCents: 5998})
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func TestRecordRoundTrip(t *testing.T) {
	in := sample(t)
	r := in.Record("order-events")
	if string(r.Key) != in.OrderID.String() {
		t.Fatalf("key %q, want the order id", r.Key)
	}
	out, err := event.FromRecord(r)
	if err != nil {
		t.Fatal(err)
	}
	if out.ID != in.ID || out.Type != in.Type || out.OrderID != in.OrderID || out.Source != in.Source ||
		!out.Time.Equal(in.Time) || string(out.Data) != string(in.Data) {
		t.Fatalf("round trip changed the event:\n in %+v\nout %+v", in, out)
	}
	var c event.Created
	if err := out.Decode(&c); err != nil || c.AmountCents != 5998 || c.Items[0].Qty != 2 {
		t.Fatalf("payload %+v (%v)", c, err)
	}
}

func setHeader(r *kgo.Record, key, value string) {
	for i := range r.Headers {
		if r.Headers[i].Key == key {
			r.Headers[i].Value = []byte(value)
			return
		}
	}
	r.Headers = append(r.Headers, kgo.RecordHeader{Key: key, Value: []byte(value)})
}

func TestFromRecordRefusesWhatItCannotTrust(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mangle func(r *kgo.Record)
		want   string
	}{
		{"malformed payload", func(r *kgo.Record) { r.Value = []byte(`{"user_id":`) }, "payload"},
		{"trailing data", func(r *kgo.Record) {
			r.Value = []byte(`{"user_id":"u","items":[{"product_id":"p","qty":1}],"amount_cents":1} {}`)
		}, "trailing"},
		{"unknown schema major", func(r *kgo.Record) { setHeader(r, "ce_schemaversion", "2.0") }, "schema version"},
		{"malformed schema version", func(r *kgo.Record) { setHeader(r, "ce_schemaversion", "1.x") }, "schema version"},
		{"no items", func(r *kgo.Record) { r.Value = []byte(`{"user_id":"u","items":[],"amount_cents":1}`) }, "no items"},
		{"absurd qty", func(r *kgo.Record) {
			r.Value = []byte(`{"user_id":"u","items":[{"product_id":"p","qty":1000000}],"amount_cents":1}`)
		}, "qty"},
		{"unknown type", func(r *kgo.Record) { setHeader(r, "ce_type", "OrderTeleported") }, "unknown event type"},
		{"unknown schema version", func(r *kgo.Record) { setHeader(r, "ce_schemaversion", "2") }, "schema version"},
		{"no spec version", func(r *kgo.Record) { setHeader(r, "ce_specversion", "") }, "specversion"},
		{"bad id", func(r *kgo.Record) { setHeader(r, "ce_id", "nope") }, "ce_id"},
		{"bad key", func(r *kgo.Record) { r.Key = []byte("not-a-uuid") }, "key"},
		{"subject differs from key", func(r *kgo.Record) { setHeader(r, "ce_subject", uuid.NewString()) }, "ce_subject"},
		{"bad source", func(r *kgo.Record) { setHeader(r, "ce_source", "elsewhere") }, "ce_source"},
		{"bad time", func(r *kgo.Record) { setHeader(r, "ce_time", "yesterday") }, "ce_time"},
		{"oversized", func(r *kgo.Record) { r.Value = []byte(strings.Repeat(" ", event.MaxPayloadBytes+1)) }, "bytes"},
		{"no headers", func(r *kgo.Record) { r.Headers = nil }, "specversion"},
		{"no user", func(r *kgo.Record) { r.Value = []byte(`{"items":[{"product_id":"p","qty":1}],"amount_cents":1}`) }, "user_id"},
		{"negative amount", func(r *kgo.Record) {
			r.Value = []byte(`{"user_id":"u","items":[{"product_id":"p","qty":1}],"amount_cents":-5}`)
		}, "amount_cents"},
		{"empty shipment", func(r *kgo.Record) { setHeader(r, "ce_type", "OrderShipped"); r.Value = []byte(`{}`) }, "shipment_id"},
		{"payment without id", func(r *kgo.Record) {
			setHeader(r, "ce_type", "PaymentCompleted")
			r.Value = []byte(`{"amount_cents":5}`)
		}, "payment_id"},
		{"failure without reason", func(r *kgo.Record) { setHeader(r, "ce_type", "PaymentFailed"); r.Value = []byte(`{}`) }, "reason"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := sample(t).Record("order-events")
			tc.mangle(r)
			_, err := event.FromRecord(r)
			if !errors.Is(err, event.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want ErrInvalid mentioning %q", err, tc.want)
			}
		})
	}
}

func TestStatusRanks(t *testing.T) {
	order := []event.Status{event.StatusCreated, event.StatusReserved, event.StatusPaid, event.StatusShipped}
	for i := 1; i < len(order); i++ {
		if order[i].Rank() <= order[i-1].Rank() {
			t.Errorf("%s does not rank above %s", order[i], order[i-1])
		}
	}
	if event.StatusCancelled.Rank() != event.StatusShipped.Rank() || !event.StatusCancelled.Terminal() {
		t.Error("CANCELLED must be terminal and rank with SHIPPED")
	}
}

func BenchmarkEncodeDecode(b *testing.B) {
	ev := sample(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := event.FromRecord(ev.Record("order-events")); err != nil {
			b.Fatal(err)
		}
	}
}

// Headers survive the outbox byte for byte: NUL, bytes that are not UTF-8,
// empty keys and values.
func TestHeadersRoundTripByteExact(t *testing.T) {
	hs := []kgo.RecordHeader{
		{Key: "ce_type", Value: []byte("OrderCreated")},
		{Key: "nul\x00key", Value: []byte("a\x00b")},
		{Key: "latin1", Value: []byte{0xff, 0xfe, 'x'}},
		{Key: "", Value: nil},
		{Key: "big", Value: bytes.Repeat([]byte{0x80}, 300)},
	}
	got, err := event.DecodeHeaders(event.EncodeHeaders(hs))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(hs) {
		t.Fatalf("%d headers back, want %d", len(got), len(hs))
	}
	for i := range hs {
		if got[i].Key != hs[i].Key || !bytes.Equal(got[i].Value, hs[i].Value) {
			t.Fatalf("header %d: %q=%q, want %q=%q", i, got[i].Key, got[i].Value, hs[i].Key, hs[i].Value)
		}
	}
	if _, err := event.DecodeHeaders([]byte{5, 'a'}); err == nil {
		t.Fatal("truncated headers decoded")
	}
}

// The document served for a deployment names its topic, as the channel's
// address and as its Kafka binding, and is otherwise the embedded one.
func TestAsyncAPIForNamesTheTopic(t *testing.T) {
	for _, topic := range []string{"order-events", "shop.orders-v2"} {
		doc := event.AsyncAPIFor(topic)
		var d struct {
			Channels map[string]struct {
				Address  string `json:"address"`
				Bindings struct {
					Kafka struct {
						Topic string `json:"topic"`
					} `json:"kafka"`
				} `json:"bindings"`
			} `json:"channels"`
		}
		if err := json.Unmarshal(doc, &d); err != nil {
			t.Fatalf("%s: %v", topic, err)
		}
		if len(d.Channels) != 1 {
			t.Fatalf("%s: %d channels, want the saga's one", topic, len(d.Channels))
		}
		for name, ch := range d.Channels {
			if ch.Address != topic || ch.Bindings.Kafka.Topic != topic {
				t.Errorf("%s: channel %s has address %q and Kafka topic %q, want both %q", topic, name, ch.Address, ch.Bindings.Kafka.Topic, topic)
			}
		}
		back := bytes.ReplaceAll(doc, []byte(`"`+topic+`"`), []byte(`"order-events"`))
		if !bytes.Equal(back, event.AsyncAPI) {
			t.Errorf("%s: the document differs from the embedded one beyond the topic", topic)
		}
	}
}
