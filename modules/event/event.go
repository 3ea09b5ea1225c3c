// Package event is the contract every participant shares: the event types of
// the order saga, their payloads, and how an event travels on Kafka.
//
// Events follow CloudEvents 1.0 in the Kafka protocol binding's binary mode:
// the attributes ride in ce_* record headers, the JSON payload is the record
// value and the order id is the record key, so every event of one order lands
// on one partition, in order.
package event

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// Type names one kind of saga event.
type Type string

// The saga's event types.
const (
	OrderCreated      Type = "OrderCreated"
	InventoryReserved Type = "InventoryReserved"
	InventoryFailed   Type = "InventoryFailed"
	PaymentCompleted  Type = "PaymentCompleted"
	PaymentFailed     Type = "PaymentFailed"
	InventoryReleased Type = "InventoryReleased"
	OrderShipped      Type = "OrderShipped"
	// OrderExpired is the saga deadline passing on an order that has not
	// reached payment: payment answers PaymentFailed unless it has decided
	// already, and the usual compensation follows. It moves no status.
	OrderExpired Type = "OrderExpired"
	// OrderCancelRequested is the order's owner (or an admin) asking for
	// the order to stop (POST /orders/{id}/cancel), emitted by the api in
	// the transaction that stamps orders.cancel_requested_at. Payment
	// answers it as it answers OrderExpired (a declined decision unless it
	// has decided already); delivery reads the stamp, not the event. It
	// moves no status.
	OrderCancelRequested Type = "OrderCancelRequested"
	// ShipmentCancelled is delivery declining to ship a paid order whose
	// cancel it saw before shipping: payment answers it with a refund. It
	// moves no status (the order stays PAID until the refund).
	ShipmentCancelled Type = "ShipmentCancelled"
	// PaymentRefunded is payment giving a completed charge back, once, for
	// a cancelled order delivery did not ship; inventory releases the
	// stock as it does after PaymentFailed. The order is CANCELLED.
	PaymentRefunded Type = "PaymentRefunded"
)

// Types lists every event type the saga knows, in lifecycle order.
var Types = []Type{OrderCreated, InventoryReserved, InventoryFailed, PaymentCompleted, PaymentFailed, InventoryReleased, OrderShipped, OrderExpired,
	OrderCancelRequested, ShipmentCancelled, PaymentRefunded}

// Known reports whether t is one of the saga's event types.
func (t Type) Known() bool {
	for _, k := range Types {
		if t == k {
			return true
		}
	}
	return false
}

// SchemaMajor and SchemaMinor are the payload version this build writes,
// as ce_schemaversion "MAJOR.MINOR". A minor version only adds optional
// fields, so any minor of this major is read (unknown fields are ignored):
// a newer participant can roll out before or after an older one. A record
// of another major is dead-lettered instead of guessed at. A bare "1" (what
// builds before minors wrote) reads as 1.0.
const (
	SchemaMajor = 1
	SchemaMinor = 0
)

// SchemaVersion is ce_schemaversion as this build writes it.
var SchemaVersion = fmt.Sprintf("%d.%d", SchemaMajor, SchemaMinor)

// schemaMajor parses ce_schemaversion's major part.
func schemaMajor(v string) (int, bool) {
	major, minor, hasMinor := strings.Cut(v, ".")
	m, err := strconv.Atoi(major)
	if err != nil || m < 0 || major != strconv.Itoa(m) {
		return 0, false
	}
	if hasMinor {
		if n, err := strconv.Atoi(minor); err != nil || n < 0 || minor != strconv.Itoa(n) {
			return 0, false
		}
	}
	return m, true
}

// Limits on what an event may carry; a record beyond them is not ours to trust.
const (
	MaxPayloadBytes = 64 << 10
	MaxItems        = 100
	MaxQty          = 1000
	maxIDLen        = 64
)

// Event is one fact of the saga.
type Event struct {
	ID      uuid.UUID       // unique per event (UUIDv7); the inbox dedups on it
	Type    Type            // what happened
	OrderID uuid.UUID       // the saga instance; also the Kafka key
	Time    time.Time       // when the emitter decided it
	Source  string          // the participant that emitted it
	Data    json.RawMessage // the type's payload, JSON

	// Trace is the W3C trace context (traceparent, tracestate) of the work
	// that emitted the event, written as record headers so one order is one
	// trace. Empty when tracing is off. Decoding leaves it empty: a
	// consumer's tracing hooks read those headers themselves.
	Trace map[string]string
}

// New builds an event with a fresh UUIDv7 id, the current time and data
// marshalled to JSON.
func New(t Type, orderID uuid.UUID, source string, data any) (Event, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return Event{}, fmt.Errorf("new event id: %w", err)
	}
	raw, err := json.Marshal(data)
	if err != nil {
		return Event{}, fmt.Errorf("encoding %s payload: %w", t, err)
	}
	return Event{ID: id, Type: t, OrderID: orderID, Time: time.Now().UTC(), Source: source, Data: raw}, nil
}

// Item is one line of an order.
type Item struct {
	ProductID string `json:"product_id"`
	Qty       int    `json:"qty"`
}

// Created is the payload of OrderCreated.
type Created struct {
	UserID      string `json:"user_id"`
	Items       []Item `json:"items"`
	AmountCents int64  `json:"amount_cents"`
}

// Reserved is the payload of InventoryReserved: payment needs the amount.
type Reserved struct {
	UserID      string `json:"user_id"`
	Items       []Item `json:"items"`
	AmountCents int64  `json:"amount_cents"`
}

// Failed is the payload of InventoryFailed and PaymentFailed.
type Failed struct {
	Reason    string `json:"reason"`
	ProductID string `json:"product_id,omitempty"`
}

// Expired is the payload of OrderExpired.
type Expired struct {
	Deadline string `json:"deadline"` // the --saga-deadline that passed, as a Go duration
}

// CancelRequested is the payload of OrderCancelRequested.
type CancelRequested struct {
	RequestedBy string `json:"requested_by"` // the user, or "admin" / "admin key ID"
}

// Refunded is the payload of PaymentRefunded: the charge given back.
type Refunded struct {
	RefundID    uuid.UUID `json:"refund_id"`
	PaymentID   uuid.UUID `json:"payment_id"`
	AmountCents int64     `json:"amount_cents"`
}

// Paid is the payload of PaymentCompleted.
type Paid struct {
	PaymentID   uuid.UUID `json:"payment_id"`
	AmountCents int64     `json:"amount_cents"`
}

// Released is the payload of InventoryReleased: the stock given back.
type Released struct {
	Items []Item `json:"items"`
}

// Shipped is the payload of OrderShipped.
type Shipped struct {
	ShipmentID uuid.UUID `json:"shipment_id"`
	Carrier    string    `json:"carrier"`
	Tracking   string    `json:"tracking"`
}

// ErrInvalid marks an event that can never be processed: it is dead-lettered,
// not retried.
var ErrInvalid = errors.New("invalid event")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Decode unmarshals the event's payload into v: fields v does not know are
// ignored (a newer minor version may add them), trailing data is refused,
// required fields must be there and items are checked against the limits.
func (e Event) Decode(v any) error {
	if err := decodePayload(e.Data, v); err != nil {
		return invalid("%s payload: %v", e.Type, err)
	}
	if err := required(v); err != nil {
		return invalid("%s payload: %v", e.Type, err)
	}
	var items []Item
	switch p := v.(type) {
	case *Created:
		items = p.Items
	case *Reserved:
		items = p.Items
	case *Released:
		items = p.Items
	default:
		return nil
	}
	return ValidateItems(items)
}

// required checks the fields a participant acts on are there: a payload
// of {} decodes, but an OrderShipped without a shipment is not a fact.
func required(v any) error {
	switch p := v.(type) {
	case *Created:
		return userAndAmount(p.UserID, p.AmountCents)
	case *Reserved:
		return userAndAmount(p.UserID, p.AmountCents)
	case *Failed:
		if p.Reason == "" {
			return errors.New("reason is required")
		}
	case *Paid:
		if p.PaymentID == uuid.Nil {
			return errors.New("payment_id is required")
		}
		if p.AmountCents < 0 {
			return errors.New("amount_cents must not be negative")
		}
	case *Expired:
		if p.Deadline == "" {
			return errors.New("deadline is required")
		}
	case *CancelRequested:
		if p.RequestedBy == "" || len(p.RequestedBy) > 2*maxIDLen {
			return fmt.Errorf("requested_by must be 1 to %d characters", 2*maxIDLen)
		}
	case *Refunded:
		if p.RefundID == uuid.Nil || p.PaymentID == uuid.Nil {
			return errors.New("refund_id and payment_id are required")
		}
		if p.AmountCents < 0 {
			return errors.New("amount_cents must not be negative")
		}
	case *Shipped:
		if p.ShipmentID == uuid.Nil || p.Carrier == "" || p.Tracking == "" {
			return errors.New("shipment_id, carrier and tracking are required")
		}
	}
	return nil
}

func userAndAmount(user string, amount int64) error {
	if user == "" || len(user) > maxIDLen {
		return fmt.Errorf("user_id must be 1 to %d characters", maxIDLen)
	}
	if amount < 0 {
		return errors.New("amount_cents must not be negative")
	}
	return nil
}

// ValidateItems checks an order's lines against the limits every participant
// relies on: at least one item, known-looking ids, positive bounded quantities.
func ValidateItems(items []Item) error {
	if len(items) == 0 {
		return invalid("no items")
	}
	if len(items) > MaxItems {
		return invalid("%d items, at most %d", len(items), MaxItems)
	}
	for i, it := range items {
		if it.ProductID == "" || len(it.ProductID) > maxIDLen {
			return invalid("items[%d].product_id must be 1 to %d characters", i, maxIDLen)
		}
		if it.Qty <= 0 || it.Qty > MaxQty {
			return invalid("items[%d].qty must be 1 to %d", i, MaxQty)
		}
	}
	return nil
}

func decodePayload(data []byte, v any) error {
	dec := json.NewDecoder(bytesReader(data))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

// Rejected marks the one event of a batch that can never be processed, so
// the consumer dead-letters its record and applies the rest of the batch.
type Rejected struct {
	ID  uuid.UUID
	Err error
}

// Reject wraps err as the rejection of ev.
func Reject(ev Event, err error) error { return &Rejected{ID: ev.ID, Err: err} }

func (r *Rejected) Error() string { return fmt.Sprintf("event %s rejected: %v", r.ID, r.Err) }

func (r *Rejected) Unwrap() error { return r.Err }
