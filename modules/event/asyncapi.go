package event

import _ "embed" // the AsyncAPI document

// AsyncAPI is the AsyncAPI 3 document of the saga's topic: every event
// type's message, its ce_* headers and its payload's JSON Schema, for
// consumers downstream that should not have to read this package. The api
// serves it at /asyncapi.json; a test validates the records of a real saga
// run against it, so it cannot drift from what the participants write.
//
//go:embed asyncapi.json
var AsyncAPI []byte
