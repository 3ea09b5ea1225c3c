package app_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// eventContract is the AsyncAPI document of the saga's topic with each
// message's headers, payload and Kafka key compiled to JSON Schemas.
type eventContract struct {
	doc      map[string]any
	messages map[string]messageSchemas // by message name: the event type
}

type messageSchemas struct{ headers, payload, key *jsonschema.Schema }

// loadEventContract reads doc (an AsyncAPI 3 document) and compiles the
// schemas of every message of its channel, formats (uuid, date-time)
// asserted.
func loadEventContract(doc []byte) (*eventContract, error) {
	parsed, err := jsonschema.UnmarshalJSON(bytes.NewReader(doc))
	if err != nil {
		return nil, fmt.Errorf("asyncapi.json: %w", err)
	}
	var d map[string]any
	if err := json.Unmarshal(doc, &d); err != nil {
		return nil, err
	}
	if d["asyncapi"] != "3.0.0" {
		return nil, fmt.Errorf("asyncapi %v, want 3.0.0", d["asyncapi"])
	}
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft7) // AsyncAPI 3's Schema Object is a superset of draft 7
	c.AssertFormat()
	const url = "asyncapi.json"
	if err := c.AddResource(url, parsed); err != nil {
		return nil, err
	}
	ec := &eventContract{doc: d, messages: map[string]messageSchemas{}}
	msgs, _ := dig(d, "components", "messages").(map[string]any)
	for name := range msgs {
		var m messageSchemas
		for ptr, into := range map[string]**jsonschema.Schema{"headers": &m.headers, "payload": &m.payload, "bindings/kafka/key": &m.key} {
			if *into, err = c.Compile(url + "#/components/messages/" + name + "/" + ptr); err != nil {
				return nil, fmt.Errorf("message %s: %s: %w", name, ptr, err)
			}
		}
		ec.messages[name] = m
	}
	return ec, nil
}

func dig(v any, path ...string) any {
	for _, p := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[p]
	}
	return v
}

// problems lists what the document lacks or has wrong for types: each
// type a message of that name, listed on the channel (address: the topic)
// and on both its operations (send and receive), and no message for a
// type that does not exist.
func (ec *eventContract) problems(topic string, types []event.Type) []string {
	var out []string
	ch, _ := dig(ec.doc, "channels", "orderEvents").(map[string]any)
	if ch == nil || ch["address"] != topic {
		return []string{fmt.Sprintf("no channel orderEvents with address %s", topic)}
	}
	refs := func(list any) []string {
		var rs []string
		switch l := list.(type) {
		case map[string]any:
			for _, v := range l {
				r, _ := dig(v, "$ref").(string)
				rs = append(rs, r)
			}
		case []any:
			for _, v := range l {
				r, _ := dig(v, "$ref").(string)
				rs = append(rs, r)
			}
		}
		return rs
	}
	onChannel := refs(ch["messages"])
	ops, _ := dig(ec.doc, "operations").(map[string]any)
	actions := map[string][]string{}
	for _, op := range ops {
		if r, _ := dig(op, "channel", "$ref").(string); r == "#/channels/orderEvents" {
			a, _ := dig(op, "action").(string)
			actions[a] = append(actions[a], refs(dig(op, "messages"))...)
		}
	}
	known := map[string]bool{}
	for _, typ := range types {
		name := string(typ)
		known[name] = true
		if _, ok := ec.messages[name]; !ok {
			out = append(out, fmt.Sprintf("event type %s has no message (headers and payload schema)", name))
			continue
		}
		if !slices.Contains(onChannel, "#/components/messages/"+name) {
			out = append(out, fmt.Sprintf("event type %s is not on the channel", name))
		}
		for _, a := range []string{"send", "receive"} {
			if !slices.Contains(actions[a], "#/channels/orderEvents/messages/"+name) {
				out = append(out, fmt.Sprintf("event type %s is not in a %s operation", name, a))
			}
		}
	}
	for name := range ec.messages {
		if !known[name] {
			out = append(out, fmt.Sprintf("message %s is not an event type", name))
		}
	}
	slices.Sort(out)
	return out
}

// validate checks one record of the topic against its type's message:
// headers, payload and key.
func (ec *eventContract) validate(r *kgo.Record) error {
	headers := map[string]any{}
	for _, h := range r.Headers {
		if _, dup := headers[h.Key]; dup {
			return fmt.Errorf("header %s twice", h.Key)
		}
		headers[h.Key] = string(h.Value)
	}
	typ, _ := headers["ce_type"].(string)
	m, ok := ec.messages[typ]
	if !ok {
		return fmt.Errorf("ce_type %q has no message in the document", typ)
	}
	if err := m.headers.Validate(headers); err != nil {
		return fmt.Errorf("%s headers: %w", typ, err)
	}
	payload, err := jsonschema.UnmarshalJSON(bytes.NewReader(r.Value))
	if err != nil {
		return fmt.Errorf("%s payload is not JSON: %w", typ, err)
	}
	if err := m.payload.Validate(payload); err != nil {
		return fmt.Errorf("%s payload %s: %w", typ, r.Value, err)
	}
	if err := m.key.Validate(string(r.Key)); err != nil {
		return fmt.Errorf("%s key %q: %w", typ, r.Key, err)
	}
	return nil
}

// The document names every event type, and the check says so when one is
// missing, listed nowhere, or not a type at all.
func TestAsyncAPIDocumentsEveryEventType(t *testing.T) {
	ec, err := loadEventContract(event.AsyncAPI)
	if err != nil {
		t.Fatal(err)
	}
	if p := ec.problems("order-events", event.Types); len(p) > 0 {
		t.Fatalf("asyncapi.json: %s", strings.Join(p, "; "))
	}
	// Copies of it, each broken once, must be reported.
	var doc map[string]any
	if err := json.Unmarshal(event.AsyncAPI, &doc); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		types []event.Type
		want  string
	}{
		"a type without a message": {append(slices.Clone(event.Types), "OrderTeleported"), "OrderTeleported has no message"},
		"a message of no type":     {event.Types[1:], "message OrderCreated is not an event type"},
	} {
		if p := ec.problems("order-events", tc.types); !slices.ContainsFunc(p, func(s string) bool { return strings.Contains(s, tc.want) }) {
			t.Errorf("%s: problems %v, want one saying %q", name, p, tc.want)
		}
	}
	ch := dig(doc, "channels", "orderEvents", "messages").(map[string]any)
	delete(ch, "OrderShipped")
	b, _ := json.Marshal(doc)
	broken, err := loadEventContract(b)
	if err != nil {
		t.Fatal(err)
	}
	if p := broken.problems("order-events", event.Types); !slices.Contains(p, "event type OrderShipped is not on the channel") {
		t.Errorf("a message off the channel: problems %v", p)
	}
	delete(dig(doc, "components", "messages").(map[string]any), "OrderExpired")
	b, _ = json.Marshal(doc)
	if broken, err = loadEventContract(b); err != nil {
		t.Fatal(err)
	}
	if p := broken.problems("order-events", event.Types); !slices.Contains(p, "event type OrderExpired has no message (headers and payload schema)") {
		t.Errorf("a type without a message: problems %v", p)
	}
}

// Every record a real saga run writes to the topic (orders that ship, one
// out of stock, one that expires at its deadline and is compensated, one
// cancelled after payment and refunded: every event type) matches the
// AsyncAPI document served at /asyncapi.json: headers, payload and key.
func TestSagaRecordsMatchTheAsyncAPIDocument(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.SagaDeadline = 3 * time.Second
	cfg.KafkaBrokers = e.broker() // delivery joins later, on the same broker
	cfg.Topic = "shop.orders-v2"  // not the default: the document must name it
	r := e.start(cfg, "api", "inventory", "payment", "status")
	resp, err := http.Get(r.url + "/asyncapi.json")
	if err != nil {
		t.Fatal(err)
	}
	served, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" || !bytes.Equal(served, event.AsyncAPIFor(cfg.Topic)) ||
		!bytes.Contains(served, []byte(`"address": "`+cfg.Topic+`"`)) {
		t.Fatalf("/asyncapi.json: %d %s, want the embedded document naming the topic %s", resp.StatusCode, resp.Header.Get("Content-Type"), cfg.Topic)
	}
	ec, err := loadEventContract(served)
	if err != nil {
		t.Fatal(err)
	}

	// An order payment cannot take (a bad deploy dead-letters it) expires:
	// OrderExpired, then PaymentFailed and InventoryReleased.
	schematest.Exec(t, e.pool, `ALTER TABLE payments ADD CONSTRAINT bad_deploy CHECK (reason IS NOT NULL)`)
	stuck := r.order(t, "u1", "", mouse(2)).OrderID.String()
	r.awaitOrderDeadLetter(t, stuck, "payment")
	r.await(t, stuck, 30*time.Second)
	schematest.Exec(t, e.pool, `ALTER TABLE payments DROP CONSTRAINT bad_deploy`)
	// An order cancelled once paid, while delivery is down: OrderCancelRequested,
	// then (delivery back) ShipmentCancelled, PaymentRefunded and InventoryReleased.
	refunded := r.order(t, "u1", "", mouse(1)).OrderID.String()
	if o := r.awaitStatus(t, refunded, event.StatusPaid, 30*time.Second); o.Status != event.StatusPaid {
		t.Fatalf("order %s is %s, want PAID before its cancel", refunded, o.Status)
	}
	r.cancelAccepted(t, refunded, "u1")
	e.start(cfg, "delivery")
	if o := r.await(t, refunded, 30*time.Second); o.Status != event.StatusCancelled {
		t.Fatalf("the order cancelled after payment ended %s, want CANCELLED", o.Status)
	}
	var ids []string
	for range 3 {
		ids = append(ids, r.order(t, "u1", "", mouse(1), event.Item{ProductID: "prod-keyboard", Qty: 2}).OrderID.String())
	}
	ids = append(ids, r.order(t, "u2", "", event.Item{ProductID: "prod-webcam", Qty: 1}).OrderID.String()) // none in stock
	for _, id := range ids {
		r.await(t, id, 30*time.Second)
	}
	e.awaitQuiet(30 * time.Second)

	recs := readTopic(t, r.sys.Brokers(), cfg.Topic)
	seen := map[event.Type]int{}
	for _, rec := range recs {
		if err := ec.validate(rec); err != nil {
			t.Errorf("record %d@%d: %v", rec.Partition, rec.Offset, err)
		}
		for _, h := range rec.Headers {
			if h.Key == "ce_type" {
				seen[event.Type(h.Value)]++
			}
		}
	}
	for _, typ := range event.Types {
		if seen[typ] == 0 {
			t.Errorf("the run wrote no %s (seen: %v): the test no longer covers every type", typ, seen)
		}
	}
	t.Logf("%d records validated: %v", len(recs), seen)
}

// readTopic reads every record topic holds now, from the start to its end
// offsets.
func readTopic(t *testing.T, brokers []string, topic string) []*kgo.Record {
	t.Helper()
	adm, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	ends, err := kadm.NewClient(adm).ListEndOffsets(t.Context(), topic)
	adm.Close()
	if err != nil || ends.Error() != nil {
		t.Fatalf("end offsets of %s: %v %v", topic, err, ends.Error())
	}
	want := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			want[o.Partition] = o.Offset
		}
	})
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	deadline := time.Now().Add(30 * time.Second)
	for len(want) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s not read to its end after 30s: %v left", topic, want)
		}
		fs := cl.PollFetches(t.Context())
		if err := fs.Err0(); err != nil {
			t.Fatal(err)
		}
		fs.EachRecord(func(rec *kgo.Record) {
			if end, ok := want[rec.Partition]; ok && rec.Offset < end {
				out = append(out, rec)
				if rec.Offset == end-1 {
					delete(want, rec.Partition)
				}
			}
		})
	}
	return out
}
