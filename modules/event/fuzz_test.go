package event_test

import (
	"errors"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/event"
)

// FuzzFromRecord feeds arbitrary records from the topic to the decoder (the
// topic is untrusted input too): it must never panic, refuse with
// ErrInvalid, or accept an event that encodes back to the same record.
func FuzzFromRecord(f *testing.F) {
	good := sample(f).Record("t")
	hdr := func(r *kgo.Record, k string) string {
		for _, h := range r.Headers {
			if h.Key == k {
				return string(h.Value)
			}
		}
		return ""
	}
	f.Add(good.Key, good.Value, hdr(good, "ce_type"), hdr(good, "ce_id"), hdr(good, "ce_source"), hdr(good, "ce_time"), hdr(good, "ce_schemaversion"))
	f.Add([]byte("0192f0c4-0000-7000-8000-000000000000"), []byte(`{"reason":"x"}`), "PaymentFailed", "0192f0c4-0000-7000-8000-000000000001", "/prozess/payment", "2026-01-01T00:00:00Z", "1")
	f.Add([]byte("x"), []byte("{"), "Nope", "", "", "", "2")
	f.Add([]byte("0192f0c4-0000-7000-8000-000000000000"), []byte(`{"shipment_id":"0192f0c4-0000-7000-8000-000000000002","carrier":"c","tracking":"t"}`), "OrderShipped", "0192f0c4-0000-7000-8000-000000000001", "/prozess/delivery", "2026-01-01T00:00:00.5+02:00", "1")
	f.Fuzz(func(t *testing.T, key, value []byte, typ, id, source, tm, version string) {
		r := &kgo.Record{Topic: "t", Key: key, Value: value, Headers: []kgo.RecordHeader{
			{Key: "ce_specversion", Value: []byte("1.0")}, {Key: "ce_type", Value: []byte(typ)}, {Key: "ce_id", Value: []byte(id)},
			{Key: "ce_source", Value: []byte(source)}, {Key: "ce_time", Value: []byte(tm)}, {Key: "ce_schemaversion", Value: []byte(version)},
		}}
		ev, err := event.FromRecord(r)
		if err != nil {
			if !errors.Is(err, event.ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if !ev.Type.Known() || len(ev.Data) > event.MaxPayloadBytes {
			t.Fatalf("accepted %+v", ev)
		}
		again, err := event.FromRecord(ev.Record("t"))
		if err != nil || again.ID != ev.ID || again.OrderID != ev.OrderID || again.Type != ev.Type || !again.Time.Equal(ev.Time) || string(again.Data) != string(ev.Data) {
			t.Fatalf("accepted event does not round-trip: %v", err)
		}
	})
}
