package app_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/app/loadgen"
	"github.com/prozess/prozess/modules/event"
)

// A load run that cancels half of its orders, at random moments within
// 300 ms of their acceptance, leaves a record `prozess check` finds clean:
// every accepted cancel ended its order CANCELLED (declined, or charged
// and refunded), a refused one had shipped, and every order ended.
func TestLoadgenCancellingAShareLeavesCheckClean(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	out, err := runCLI(t, "loadgen", "--url", r.url, "--database-url", e.dbURL, "--kafka-brokers", strings.Join(r.sys.Brokers(), ","),
		"--topic", cfg.Topic, "--rate", "60", "--duration", "4s", "--warmup", "0", "--deadline", "30s",
		"--cancel-rate", "0.5", "--cancel-within", "300ms", "--json", "--log-level", "warn")
	if err != nil {
		t.Fatalf("loadgen: %v\n%s", err, out)
	}
	var res struct {
		Runs []loadgen.Result `json:"runs"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &res); err != nil || len(res.Runs) != 1 {
		t.Fatalf("loadgen output: %v\n%s", err, out)
	}
	run := res.Runs[0]
	c := run.Cancels
	t.Logf("sent %d, unfinished %d, outcomes %v, cancels %+v", run.Sent, run.Unfinished, run.Outcomes, c)
	// How the cancels split between before the charge, between charge and
	// shipment, and after it depends on the machine's speed; that each
	// ends right is held by check below and by TestCancelRacingChargeAndShipment.
	if c == nil || c.Sent < run.Accepted/4 || c.Errors != 0 || c.Accepted == 0 || c.Accepted+c.Refused != c.Sent {
		t.Fatalf("cancels %+v for %d accepted orders: want about half cancelled, some accepted, no errors", c, run.Accepted)
	}
	if run.Unfinished != 0 || run.Outcomes[string(event.OrderShipped)] == 0 {
		t.Fatalf("outcomes %v, %d unfinished: want every order ended, the uncancelled ones shipped", run.Outcomes, run.Unfinished)
	}
	e.awaitQuiet(30 * time.Second)
	if n := e.count(`SELECT count(*) FROM orders WHERE cancel_requested_at IS NOT NULL AND status = 'CANCELLED'`); n != int64(c.Accepted) {
		t.Fatalf("%d orders cancelled on request, for %d cancels accepted", n, c.Accepted)
	}
	report := e.checkClean(t, r.sys.Brokers())
	if !strings.Contains(report, "ok   refunds only for cancelled, unshipped orders") {
		t.Fatalf("check did not report the refund rule:\n%s", report)
	}
}
