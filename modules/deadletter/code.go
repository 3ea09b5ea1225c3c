package deadletter

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// The codes of Code: what a dead letter's owner is told of why it was
// dead-lettered. They are stable (clients may switch on them) and say
// nothing of how prozess stores things.
const (
	// CodeUnsupportedVersion: the event's schema version is one this
	// build does not read (a newer major).
	CodeUnsupportedVersion = "unsupported_schema_version"
	// CodeInvalidEvent: the record does not decode as a saga event, or
	// its payload breaks the event contract.
	CodeInvalidEvent = "invalid_event"
	// CodeDataError: the event carries a value the database refused
	// (PostgreSQL class 22, a data exception).
	CodeDataError = "data_error"
	// CodeConstraintViolation: applying the event broke a rule of the
	// database (PostgreSQL class 23, an integrity constraint).
	CodeConstraintViolation = "constraint_violation"
	// CodeKeptFailing: applying it failed with an error of neither kind
	// for --poison-after.
	CodeKeptFailing = "kept_failing"
	// CodeRejected: anything else the participant refused.
	CodeRejected = "rejected"
)

// Codes lists every code Code returns.
var Codes = []string{CodeUnsupportedVersion, CodeInvalidEvent, CodeDataError, CodeConstraintViolation, CodeKeptFailing, CodeRejected}

// sqlState finds the SQLSTATE pgconn.PgError.Error() ends a PostgreSQL
// error with.
var sqlState = regexp.MustCompile(`\(SQLSTATE ([0-9A-Z]{5})\)`)

// Code is a dead letter's reason as its order's owner sees it. A reason is
// the error text of whatever refused the record, byte-exact for operators
// (PostgreSQL's own message, with table, column and constraint names, and
// SQLSTATE); an owner is told only what kind of refusal it was. It is
// derived from the stored reason, not stored beside it, so dead letters
// recorded before codes existed have one too; the order of the tests
// follows how the consumer words reasons (app/saga: poison after
// --poison-after wraps the last error, which may be PostgreSQL's).
func Code(reason string) string {
	switch {
	case strings.Contains(reason, "neither transient nor the record's"):
		return CodeKeptFailing
	case strings.Contains(reason, "unknown schema version"):
		return CodeUnsupportedVersion
	case strings.HasPrefix(reason, "invalid event"), strings.Contains(reason, ": invalid event"):
		return CodeInvalidEvent
	}
	if m := sqlState.FindStringSubmatch(reason); m != nil {
		switch m[1][:2] {
		case "22":
			return CodeDataError
		case "23":
			return CodeConstraintViolation
		}
	}
	return CodeRejected
}

// ForOwner is e as the owner of its order sees it: the code instead of the
// reason, and not who re-drove it (an admin key's id).
func (e Entry) ForOwner() Entry {
	e.Reason, e.ReplayedBy = "", ""
	return e
}

// ForOwnerTrail is the payload of a TrailType entry of the audit trail (a
// re-drive of a dead letter, or a parked record sent again) as the owner of
// its order sees it: the dead letter's code instead of its reason, and not
// the admin key that did it. Other entries are not this package's.
func ForOwnerTrail(payload []byte) ([]byte, error) {
	var p map[string]any
	if err := json.Unmarshal(payload, &p); err != nil {
		return nil, fmt.Errorf("decoding a %s entry: %w", TrailType, err)
	}
	if reason, ok := p["reason"].(string); ok {
		if _, dead := p["dead_letter_id"]; dead {
			p["code"] = Code(reason)
		}
	}
	delete(p, "reason")
	delete(p, "replayed_by")
	out, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encoding a %s entry: %w", TrailType, err)
	}
	return out, nil
}
