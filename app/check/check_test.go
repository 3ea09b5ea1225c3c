package check_test

import (
	"testing"

	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/modules/event"
)

// The cancel's paths are lifecycle paths only with their one cancel
// request; the refund's path never ships.
func TestValidTrailCancelPaths(t *testing.T) {
	const (
		c  = event.OrderCreated
		r  = event.InventoryReserved
		pc = event.PaymentCompleted
		pf = event.PaymentFailed
		rl = event.InventoryReleased
		x  = event.OrderCancelRequested
		sc = event.ShipmentCancelled
		rf = event.PaymentRefunded
		sh = event.OrderShipped
		ex = event.OrderExpired
	)
	for _, tc := range []struct {
		trail []event.Type
		valid bool
	}{
		{[]event.Type{c, r, pc, x, sc, rf, rl}, true},
		{[]event.Type{c, x, r, pc, sc, rf}, true}, // the release still to come
		{[]event.Type{c, x, pf, r, rl}, true},     // declined before the reservation
		{[]event.Type{c, r, x, pf, rl}, true},
		{[]event.Type{c, r, pc, sh, x}, true}, // too late: shipped, the cancel changes nothing
		{[]event.Type{c, ex, x, pf, r, rl}, true},
		{[]event.Type{c, r, pc, sc, rf, rl}, false},       // a refund with no cancel request
		{[]event.Type{c, r, pc, x, sc, rf, sh}, false},    // shipped after a refund
		{[]event.Type{c, r, pc, x, sh, sc}, false},        // withheld after shipping
		{[]event.Type{c, r, pc, x, x, sc, rf, rl}, false}, // two cancel requests
		{[]event.Type{c, x, pf, r, rf}, false},            // a refund of a declined order
	} {
		if got := check.ValidTrail(tc.trail); got != tc.valid {
			t.Errorf("ValidTrail(%v) = %v, want %v", tc.trail, got, tc.valid)
		}
	}
}
