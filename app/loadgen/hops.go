package loadgen

import (
	"bytes"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/event"
)

// A hop is one stretch of an order's path, timed from what the topic
// already carries: every event's ce_time (when its emitter decided it,
// inside the transaction that writes it to the outbox) and its record's
// timestamp (when the relay handed it to the producer), plus the order's
// due time and when loadgen's own consumer saw the terminal event. So, for
// each event E of the path and the event N that answers it:
//
//	api:        due -> OrderCreated decided (HTTP, the writer's queue)
//	E outbox:   E decided -> E published (commit, relay wake-up, pickup)
//	E -> N:     E published -> N decided (broker, fetch, batch, handler)
//	observe:    terminal published -> seen by loadgen (its own fetch)
//
// Every clock is the machine's own, so the stretches add up to the
// end-to-end latency. A record timestamp has millisecond precision (Kafka's),
// so each stretch that starts or ends at a publication is good to about a
// millisecond: an idle outbox hop can show as -0.0.
type stamp struct{ decided, published time.Time }

// hopPath is the happy path's events in order; a declined or failed
// order's hops are left out of the breakdown.
var hopPath = []event.Type{event.OrderCreated, event.InventoryReserved, event.PaymentCompleted, event.OrderShipped}

// Hop is one stretch's latency over the orders that took it.
type Hop struct {
	Name string  `json:"name"`
	Lat  Summary `json:"latency"`
}

// stampOf reads an event record's decision time and publish time.
func stampOf(rec *kgo.Record) (event.Type, stamp, bool) {
	var typ event.Type
	var decided time.Time
	for _, h := range rec.Headers {
		switch h.Key {
		case "ce_type":
			typ = event.Type(h.Value)
		case "ce_time":
			decided, _ = time.Parse(time.RFC3339Nano, string(h.Value))
		}
	}
	if typ == "" || decided.IsZero() {
		return "", stamp{}, false
	}
	return typ, stamp{decided: decided, published: rec.Timestamp}, true
}

// hops computes the breakdown over the shipped orders among due.
func hops(due map[string]time.Time, stamps map[string]map[event.Type]stamp, seen map[string]time.Time) []Hop {
	var names []string
	samples := map[string][]time.Duration{}
	add := func(name string, d time.Duration) {
		if _, ok := samples[name]; !ok {
			names = append(names, name)
		}
		samples[name] = append(samples[name], d)
	}
	for id, at := range due {
		s := stamps[id]
		complete := s != nil
		for _, t := range hopPath {
			if _, ok := s[t]; !ok {
				complete = false
			}
		}
		if _, ok := seen[id]; !complete || !ok {
			continue
		}
		add("api: due -> OrderCreated decided", s[event.OrderCreated].decided.Sub(at))
		for i, t := range hopPath {
			add(string(t)+" outbox: decided -> published", s[t].published.Sub(s[t].decided))
			if i+1 < len(hopPath) {
				n := hopPath[i+1]
				add(string(t)+" -> "+string(n)+": published -> decided", s[n].decided.Sub(s[t].published))
			}
		}
		add("observe: OrderShipped published -> seen", seen[id].Sub(s[event.OrderShipped].published))
	}
	out := make([]Hop, len(names))
	for i, n := range names {
		out[i] = Hop{Name: n, Lat: Summarize(samples[n])}
	}
	return out
}

// HopTable renders a run's hops.
func HopTable(r Result) string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "hops at %.0f/s over %d shipped orders (ms p50/p90/p99):\n", r.TargetRate, r.hopOrders())
	for _, h := range r.Hops {
		fmt.Fprintf(&b, "  %-62s %7.1f %7.1f %7.1f\n", h.Name, ms(h.Lat.P50), ms(h.Lat.P90), ms(h.Lat.P99))
	}
	return b.String()
}

func (r Result) hopOrders() int {
	if len(r.Hops) == 0 {
		return 0
	}
	return r.Hops[0].Lat.Count
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }
