package deadletter_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/prozess/prozess/modules/deadletter"
)

// A filter that could only match by accident is refused, naming the field
// at fault (the API says filter.FIELD, the CLI --FIELD); a good one parses.
func TestFilterRefusesWhatCannotMatch(t *testing.T) {
	participants := []string{"api", "inventory", "payment", "delivery", "status"}
	for _, tc := range []struct {
		name  string
		in    deadletter.FilterText
		field string
	}{
		{"unknown participant", deadletter.FilterText{Participant: "deliveryy"}, "participant"},
		{"event type with a space", deadletter.FilterText{EventType: "Order Shipped"}, "event_type"},
		{"reason with NUL", deadletter.FilterText{Reason: "a\x00b"}, "reason"},
		{"reason over 500 characters", deadletter.FilterText{Reason: strings.Repeat("a", 501)}, "reason"},
		{"since not RFC 3339", deadletter.FilterText{Since: "yesterday"}, "since"},
		{"until not RFC 3339", deadletter.FilterText{Until: "2026-01-02"}, "until"},
		{"window backwards", deadletter.FilterText{Since: "2026-01-02T00:00:00Z", Until: "2026-01-01T00:00:00Z"}, "until"},
		{"empty window", deadletter.FilterText{Since: "2026-01-02T00:00:00Z", Until: "2026-01-02T00:00:00Z"}, "until"},
		{"order id not a UUID", deadletter.FilterText{OrderID: "42"}, "order_id"},
		{"nil order id", deadletter.FilterText{OrderID: "00000000-0000-0000-0000-000000000000"}, "order_id"},
		{"id zero", deadletter.FilterText{IDs: []int64{3, 0}}, "ids"},
		{"too many ids", deadletter.FilterText{IDs: make([]int64, deadletter.MaxIDs+1)}, "ids"},
		{"negative through_id", deadletter.FilterText{ThroughID: -1}, "through_id"},
	} {
		_, err := tc.in.Parse(participants)
		var fe *deadletter.FilterError
		if !errors.As(err, &fe) || fe.Field != tc.field || fe.Message == "" {
			t.Errorf("%s: %v, want a FilterError for %s", tc.name, err, tc.field)
		}
		// Only a window that is empty is well-formed (the API's 422).
		if want := strings.Contains(tc.name, "window"); fe != nil && fe.Window != want {
			t.Errorf("%s: Window %v, want %v", tc.name, fe.Window, want)
		}
	}
	f, err := deadletter.FilterText{Participant: "delivery", EventType: "PaymentCompleted", Reason: "23514",
		Since: "2026-01-01T00:00:00Z", Until: "2026-01-02T00:00:00.5Z", OrderID: "01a22e0a-dc12-7b8f-9d18-b48f997dbca8",
		IDs: []int64{1, 2}, ThroughID: 9}.Parse(participants)
	if err != nil || f.Since == nil || f.Until == nil || f.OrderID == nil || f.OrderID.String() != "01a22e0a-dc12-7b8f-9d18-b48f997dbca8" {
		t.Fatalf("a good filter: %+v, %v", f, err)
	}
	// 500 characters is the limit, however many bytes they take (the
	// document's maxLength counts characters).
	if _, err := (deadletter.FilterText{Reason: strings.Repeat("é", 500)}).Parse(participants); err != nil {
		t.Fatalf("a reason of 500 two-byte characters: %v", err)
	}
	if _, err := (deadletter.FilterText{}).Parse(participants); err != nil {
		t.Fatalf("the empty filter (everything): %v", err)
	}
}
