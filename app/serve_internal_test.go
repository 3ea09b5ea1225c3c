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

// check's callers tell "violations found" (1) from "could not check" (2).
func TestCheckExitCodes(t *testing.T) {
	if got := exitCode(violations(3)); got != 1 {
		t.Errorf("violations exit %d, want 1", got)
	}
	if got := Main([]string{"check", "--database-url", "postgres://postgres@127.0.0.1:1/prozess?connect_timeout=2", "--kafka-brokers", "127.0.0.1:1", "--log-level", "error"}); got != 2 {
		t.Errorf("check with PostgreSQL unreachable exits %d, want 2", got)
	}
	if got := Main([]string{"orders", "get", "not-a-uuid"}); got != 1 {
		t.Errorf("another command's error exits %d, want 1", got)
	}
}

// SASL PLAIN sends the password itself, so it is refused without TLS.
func TestSASLPlainNeedsTLS(t *testing.T) {
	t.Setenv("PROZESS_KAFKA_SASL_PASSWORD", "secret")
	k := KafkaSecurity{SASLMechanism: "PLAIN", SASLUser: "u"}
	if _, err := k.conn([]string{"127.0.0.1:9092"}); err == nil || !strings.Contains(err.Error(), "--kafka-tls") || strings.Contains(err.Error(), "secret") {
		t.Fatalf("PLAIN without TLS: %v", err)
	}
	k.TLS.Enabled = true
	if _, err := k.conn([]string{"127.0.0.1:9092"}); err != nil {
		t.Fatalf("PLAIN over TLS: %v", err)
	}
	k = KafkaSecurity{SASLMechanism: "SCRAM-SHA-512", SASLUser: "u"}
	if _, err := k.conn([]string{"127.0.0.1:9092"}); err != nil {
		t.Fatalf("SCRAM without TLS (the password never crosses): %v", err)
	}
}
