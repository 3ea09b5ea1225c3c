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

// What the owner of an order is told: the kind of refusal, never the
// text. The reasons are worded as the consumer loop words them (app's
// poison tests check Code on the real ones).
func TestCodeNamesTheKindOfRefusal(t *testing.T) {
	for reason, want := range map[string]string{
		`ERROR: new row for relation "shipments" violates check constraint "bad_deploy" (SQLSTATE 23514)`:        deadletter.CodeConstraintViolation,
		`ERROR: invalid byte sequence for encoding "UTF8": 0x00 (SQLSTATE 22021)`:                                deadletter.CodeDataError,
		`invalid event: unknown schema version "99" (this build reads 1.x)`:                                      deadletter.CodeUnsupportedVersion,
		`invalid event: OrderShipped payload: shipment_id, carrier and tracking are required`:                    deadletter.CodeInvalidEvent,
		`failed for 1m0s with an error that is neither transient nor the record's: ERROR: boom (SQLSTATE P0001)`: deadletter.CodeKeptFailing,
		`ERROR: relation "shipments" does not exist (SQLSTATE 42P01)`:                                            deadletter.CodeRejected,
	} {
		if got := deadletter.Code(reason); got != want {
			t.Errorf("Code(%q) = %s, want %s", reason, got, want)
		}
	}
}

// A re-drive's trail entry as its owner sees it: the code, not the reason
// or the admin key.
func TestForOwnerTrailKeepsTheCodeOnly(t *testing.T) {
	got, err := deadletter.ForOwnerTrail([]byte(`{"dead_letter_id":7,"participant":"delivery","event_type":"PaymentCompleted",` +
		`"reason":"ERROR: violates check constraint \"bad_deploy\" (SQLSTATE 23514)","replayed_by":"k1a2b3c4"}`))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"code":"constraint_violation","dead_letter_id":7,"event_type":"PaymentCompleted","participant":"delivery"}`
	if string(got) != want {
		t.Fatalf("owner's entry %s, want %s", got, want)
	}
}
