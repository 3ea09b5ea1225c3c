package app

import (
	"strings"
	"testing"
)

// The traced service is named for the participants a process runs.
func TestServiceName(t *testing.T) {
	for names, want := range map[string]string{"": "prozess", "payment": "prozess-payment", "delivery status": "prozess-delivery-status"} {
		var ps []string
		if names != "" {
			ps = strings.Fields(names)
		}
		if got := serviceName(ps); got != want {
			t.Errorf("serviceName(%v) = %q, want %q", ps, got, want)
		}
	}
	if got := serviceName(Participants()); got != "prozess" {
		t.Errorf("serviceName(all) = %q", got)
	}
}
