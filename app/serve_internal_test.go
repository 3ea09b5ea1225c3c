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

// The demo key's rule and the private admin port hinge on what counts as
// loopback only.
func TestLoopbackOnly(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8080": true, "localhost:8080": true, "[::1]:8080": true, "127.0.0.2:1": true,
		":8080": false, "0.0.0.0:8080": false, "[::]:8080": false, "10.0.0.5:8080": false, "api.example.com:443": false, "nonsense": false,
	} {
		if got := loopbackOnly(addr); got != want {
			t.Errorf("loopbackOnly(%q) = %v, want %v", addr, got, want)
		}
	}
	if got := adminAddr(AdminAuto, []string{"payment"}); !loopbackOnly(got) {
		t.Errorf("the automatic admin address %s is not loopback only", got)
	}
}
