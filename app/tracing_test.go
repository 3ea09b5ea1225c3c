package app_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/modules/event"
)

// syncBuffer is a log destination the system's goroutines can share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(s.b.Bytes()))
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// One order is one trace: the api's request span, every publish, receive
// and handling span of every participant, each event's spans children of
// the handling that emitted it. Log lines about an order carry its trace id.
func TestOneOrderIsOneTrace(t *testing.T) {
	e := newEnv(t)
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { _ = tp.Shutdown(t.Context()) })
	cfg := e.config()
	cfg.TracerProvider = tp
	logs := &syncBuffer{}
	log, err := telemetry.NewLoggerTo(logs, "info", "json")
	if err != nil {
		t.Fatal(err)
	}
	r := e.startLogged(cfg, log)

	shipped := r.order(t, "u1", "", mouse(1)).OrderID.String()
	cancelled := r.order(t, "u1", "", event.Item{ProductID: "prod-webcam", Qty: 1}).OrderID.String()
	for _, id := range []string{shipped, cancelled} {
		r.await(t, id, 15*time.Second)
	}

	// Every participant of the shipped order, and who handled what.
	want := []string{
		"inventory handle OrderCreated", "payment handle InventoryReserved", "delivery handle PaymentCompleted",
		"status handle OrderCreated", "status handle InventoryReserved", "status handle PaymentCompleted", "status handle OrderShipped",
	}
	var spans tracetest.SpanStubs
	var root tracetest.SpanStub
	deadline := time.Now().Add(15 * time.Second)
	for {
		spans, root = orderTrace(exp.GetSpans(), shipped)
		if root.Name != "" && hasAll(names(spans), want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("trace of %s after 15s: root %q, spans %v", shipped, root.Name, names(spans))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if root.Name != "POST /orders" || root.SpanKind != trace.SpanKindServer {
		t.Fatalf("trace root is %q (%v), want the api's POST /orders server span", root.Name, root.SpanKind)
	}
	byID := map[trace.SpanID]tracetest.SpanStub{}
	for _, s := range spans {
		byID[s.SpanContext.SpanID()] = s
	}
	// One connected tree: every span's parent is in the trace.
	for _, s := range spans {
		if s.SpanContext.SpanID() == root.SpanContext.SpanID() {
			continue
		}
		if _, ok := byID[s.Parent.SpanID()]; !ok {
			t.Errorf("span %q has a parent outside the trace", s.Name)
		}
	}
	if n := count(names(spans), "order-events publish"); n != 4 {
		t.Errorf("%d publish spans, want 4 (one per event of the order)", n)
	}
	// The last handling descends from every step before it.
	var last tracetest.SpanStub
	for _, s := range spans {
		if s.Name == "status handle OrderShipped" {
			last = s
		}
	}
	var path []string
	for s, ok := last, true; ok; s, ok = byID[s.Parent.SpanID()] {
		path = append(path, s.Name)
	}
	for _, step := range []string{"delivery handle PaymentCompleted", "payment handle InventoryReserved", "inventory handle OrderCreated", "POST /orders"} {
		if !slices.Contains(path, step) {
			t.Errorf("%q is not an ancestor of the OrderShipped handling; path %v", step, path)
		}
	}

	// Log lines about each order carry that order's trace id: the api's
	// (logged with the request's span) and inventory's (logged for one order
	// of a batch).
	_, cancelledRoot := orderTrace(exp.GetSpans(), cancelled)
	wantLogs := map[string]string{
		"order created/" + shipped:  root.SpanContext.TraceID().String(),
		"out of stock/" + cancelled: cancelledRoot.SpanContext.TraceID().String(),
	}
	for _, l := range logs.lines() {
		id, _ := l["order_id"].(string)
		if tid, ok := wantLogs[l["msg"].(string)+"/"+id]; ok {
			if l["trace_id"] != tid {
				t.Errorf("log line %q for %s has trace_id %v, want %s", l["msg"], id, l["trace_id"], tid)
			}
			delete(wantLogs, l["msg"].(string)+"/"+id)
		}
	}
	for k := range wantLogs {
		t.Errorf("no log line %s", k)
	}
}

// orderTrace returns the spans of the trace whose handling spans name
// orderID, and its root.
func orderTrace(all tracetest.SpanStubs, orderID string) (tracetest.SpanStubs, tracetest.SpanStub) {
	var tid trace.TraceID
	for _, s := range all {
		for _, a := range s.Attributes {
			if a.Key == "prozess.order_id" && a.Value.AsString() == orderID {
				tid = s.SpanContext.TraceID()
			}
		}
	}
	var out tracetest.SpanStubs
	var root tracetest.SpanStub
	for _, s := range all {
		if s.SpanContext.TraceID() != tid || !tid.IsValid() {
			continue
		}
		out = append(out, s)
		if !s.Parent.IsValid() {
			root = s
		}
	}
	return out, root
}

func names(spans tracetest.SpanStubs) []string {
	out := make([]string, len(spans))
	for i, s := range spans {
		out[i] = s.Name
	}
	return out
}

func hasAll(have, want []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

func count(have []string, name string) int {
	n := 0
	for _, h := range have {
		if strings.EqualFold(h, name) {
			n++
		}
	}
	return n
}
