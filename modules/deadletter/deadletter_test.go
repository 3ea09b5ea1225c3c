package deadletter_test

import (
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/deadletter"
)

// A replay is judged by when the event happened, not when it was
// dead-lettered: a participant may have applied it long before.
func TestAgeIsTheEventsUnlessLater(t *testing.T) {
	now := time.Now()
	event, dead := now.Add(-48*time.Hour), now.Add(-time.Hour)
	for _, tc := range []struct {
		name   string
		ceTime string
		deadAt time.Time
		want   time.Duration
	}{
		{"event before its dead letter", event.Format(time.RFC3339Nano), dead, 48 * time.Hour},
		{"ce_time after the dead letter", now.Format(time.RFC3339Nano), dead, time.Hour},
		{"no ce_time", "", dead, time.Hour},
		{"nothing known", "", time.Time{}, 0},
	} {
		if got := deadletter.Age(tc.ceTime, tc.deadAt); got.Round(time.Minute) != tc.want {
			t.Errorf("%s: age %s, want %s", tc.name, got, tc.want)
		}
	}
	if err := deadletter.TooOld(48*time.Hour, 25*time.Hour, "order-events"); err == nil || !strings.Contains(err.Error(), "older than the inboxes keep event ids") {
		t.Errorf("48 h against 25 h of retention: %v", err)
	}
	for _, retention := range []time.Duration{0, 49 * time.Hour} {
		if err := deadletter.TooOld(48*time.Hour, retention, "order-events"); err != nil {
			t.Errorf("48 h against %s: %v", retention, err)
		}
	}
}
