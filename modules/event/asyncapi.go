package event

import (
	"bytes"
	_ "embed" // the AsyncAPI document
	"encoding/json"
)

// AsyncAPI is the AsyncAPI 3 document of the saga's topic: every event
// type's message, its ce_* headers and its payload's JSON Schema, for
// consumers downstream that should not have to read this package. The api
// serves it at /asyncapi.json, naming the topic it runs with
// (AsyncAPIFor); a test validates the records of a real saga run against
// it, so it cannot drift from what the participants write.
//
//go:embed asyncapi.json
var AsyncAPI []byte

// The default topic's two mentions in the document: the channel's address
// and its Kafka binding's topic.
var (
	defaultAddress = []byte(`"address": "order-events"`)
	defaultBinding = []byte(`"topic": "order-events"`)
)

// AsyncAPIFor is AsyncAPI with topic as the channel's address and Kafka
// binding, so that a deployment run with --topic tells its consumers
// where its events are, not where a default deployment's would be. The
// document is otherwise the embedded one, byte for byte.
func AsyncAPIFor(topic string) []byte {
	name, _ := json.Marshal(topic) // a string always marshals
	doc := bytes.Replace(AsyncAPI, defaultAddress, append([]byte(`"address": `), name...), 1)
	return bytes.Replace(doc, defaultBinding, append([]byte(`"topic": `), name...), 1)
}
