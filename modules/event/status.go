package event

// Status is where an order stands in the saga's lifecycle.
type Status string

// The lifecycle: CREATED -> INVENTORY_RESERVED -> PAID -> SHIPPED, or
// CANCELLED (out of stock, payment declined, the saga deadline, or a
// cancel: before payment by a declined decision, after it by a refund).
const (
	StatusCreated   Status = "CREATED"
	StatusReserved  Status = "INVENTORY_RESERVED"
	StatusPaid      Status = "PAID"
	StatusShipped   Status = "SHIPPED"
	StatusCancelled Status = "CANCELLED"
)

// Rank orders statuses along the lifecycle. Status only ever moves to a
// higher rank, so a duplicate or late event can never move it back; both
// terminal statuses share the top rank, so neither overrides the other.
func (s Status) Rank() int {
	switch s {
	case StatusCreated:
		return 0
	case StatusReserved:
		return 1
	case StatusPaid:
		return 2
	case StatusShipped, StatusCancelled:
		return 3
	}
	return -1
}

// Terminal reports whether the saga is over for an order in status s.
func (s Status) Terminal() bool { return s == StatusShipped || s == StatusCancelled }

// StatusAfter returns the status an event moves its order to, and false for
// events that move no status (InventoryReleased follows CANCELLED; an
// OrderCancelRequested or ShipmentCancelled only asks for one).
func StatusAfter(t Type) (Status, bool) {
	switch t {
	case OrderCreated:
		return StatusCreated, true
	case InventoryReserved:
		return StatusReserved, true
	case PaymentCompleted:
		return StatusPaid, true
	case OrderShipped:
		return StatusShipped, true
	case InventoryFailed, PaymentFailed, PaymentRefunded:
		return StatusCancelled, true
	}
	return "", false
}

// OrderStatus is the status an order has once an event of type t has
// happened to it: StatusAfter's, and CANCELLED after InventoryReleased,
// which only follows PaymentFailed or PaymentRefunded. For views of the
// event stream.
func (t Type) OrderStatus() Status {
	if st, ok := StatusAfter(t); ok {
		return st
	}
	if t == InventoryReleased {
		return StatusCancelled
	}
	return ""
}
