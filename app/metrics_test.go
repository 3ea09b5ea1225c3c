package app_test

import (
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/event"
)

func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	return string(b)
}

// value returns the value of the first sample whose line starts with
// prefix (a metric name with its labels), or -1.
func value(metrics, prefix string) float64 {
	v, ok := metricSample(metrics, prefix)
	if !ok {
		return -1
	}
	return v
}

// metricSample returns the value of the first sample named exactly by
// prefix (a metric name, or a name with its labels), and whether there was
// one.
func metricSample(metrics, prefix string) (float64, bool) {
	for _, line := range strings.Split(metrics, "\n") {
		rest, ok := strings.CutPrefix(line, prefix)
		// The whole name: prozess_x must not read prozess_x_total.
		if !ok || (!strings.HasSuffix(prefix, " ") && (rest == "" || (rest[0] != ' ' && rest[0] != '{'))) {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			return v, true
		}
	}
	return 0, false
}

// mustValue is metricSample for a metric that must be there: a missing
// one fails the test (read as -1 it would pass for a value, and two missing
// ones for no change).
func mustValue(t *testing.T, metrics, prefix string) float64 {
	t.Helper()
	v, ok := metricSample(metrics, prefix)
	if !ok {
		t.Fatalf("no sample %s in /metrics", prefix)
	}
	return v
}

// After a few orders, /metrics (on the admin address only) has the saga's metrics with values that match what happened, and
// /livez and /readyz answer.
func TestMetricsAndHealth(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	admin := "http://" + r.sys.AdminAddr()
	for _, p := range []string{"/livez", "/readyz"} {
		deadline := time.Now().Add(15 * time.Second)
		for {
			resp, err := http.Get(admin + p)
			if err == nil && resp.StatusCode == 200 {
				resp.Body.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not 200 within 15s (%v)", p, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	var ids []string
	for range 3 {
		ids = append(ids, r.order(t, "u1", "", mouse(1)).OrderID.String())
	}
	for _, id := range ids {
		if o := r.await(t, id, 15*time.Second); o.Status != event.StatusShipped {
			t.Fatalf("order %s", o.Status)
		}
	}
	e.awaitQuiet(10 * time.Second)
	m := scrape(t, admin+"/metrics")
	checks := map[string]func(float64) bool{
		`prozess_http_requests_total{code="201",method="POST",route="/orders"}`:         func(v float64) bool { return v == 3 },
		`prozess_http_request_duration_seconds_count{method="POST",route="/orders"}`:    func(v float64) bool { return v == 3 },
		`prozess_consumer_records_total{outcome="applied",participant="inventory"}`:     func(v float64) bool { return v == 3 },
		`prozess_consumer_records_total{outcome="applied",participant="status"}`:        func(v float64) bool { return v == 12 },
		`prozess_consumer_records_total{outcome="dead_lettered",participant="payment"}`: func(v float64) bool { return v == 0 },
		`prozess_consumer_batch_records_count{participant="delivery"}`:                  func(v float64) bool { return v >= 1 },
		`prozess_consumer_batch_duration_seconds_sum{participant="payment"}`:            func(v float64) bool { return v > 0 },
		`prozess_relay_published_records_total`:                                         func(v float64) bool { return v == 12 },
		`prozess_orders{status="SHIPPED"}`:                                              func(v float64) bool { return v == 3 },
		`prozess_outbox_rows`:                                                           func(v float64) bool { return v == 0 },
		`prozess_outbox_oldest_age_seconds`:                                             func(v float64) bool { return v == 0 },
		`prozess_db_pool_acquires_total`:                                                func(v float64) bool { return v > 0 },
		`go_goroutines`:                                                                 func(v float64) bool { return v > 10 },
		// Every record committed: nothing left behind by any group.
		`prozess_consumer_lag_records{participant="inventory"}`: func(v float64) bool { return v == 0 },
		`prozess_consumer_lag_records{participant="status"}`:    func(v float64) bool { return v == 0 },
		// Three orders took each step once; a step takes more than nothing
		// and less than the test's patience.
		`prozess_saga_step_duration_seconds_count{from="OrderCreated",to="InventoryReserved"}`:     func(v float64) bool { return v == 3 },
		`prozess_saga_step_duration_seconds_count{from="InventoryReserved",to="PaymentCompleted"}`: func(v float64) bool { return v == 3 },
		`prozess_saga_step_duration_seconds_count{from="PaymentCompleted",to="OrderShipped"}`:      func(v float64) bool { return v == 3 },
		`prozess_saga_step_duration_seconds_sum{from="OrderCreated",to="InventoryReserved"}`:       func(v float64) bool { return v > 0 && v < 45 },
	}
	for prefix, ok := range checks {
		if v, found := metricSample(m, prefix); !found {
			t.Errorf("%s missing", prefix)
		} else if !ok(v) {
			t.Errorf("%s = %v", prefix, v)
		}
	}
	// franz-go's own client metrics, one series per client.
	if !regexp.MustCompile(`prozess_kafka_\w+\{client_id="prozess-inventory"`).MatchString(m) {
		t.Error("no Kafka client metrics for prozess-inventory")
	}
	// /metrics is private: not on the api's public port.
	if resp, err := http.Get(r.url + "/metrics"); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("api port /metrics: %v %v, want 404", resp.Status, err)
	} else {
		resp.Body.Close()
	}
	// However often it is scraped, the state behind it is read at most
	// once per interval.
	before := mustValue(t, scrape(t, admin+"/metrics"), "prozess_metrics_state_reads_total")
	for range 20 {
		scrape(t, admin+"/metrics")
	}
	if after := mustValue(t, scrape(t, admin+"/metrics"), "prozess_metrics_state_reads_total"); after-before > 1 {
		t.Errorf("21 scrapes read the state %v times, want at most 1 more", after-before)
	}
	// Routes are patterns, never raw ids.
	if strings.Contains(m, ids[0]) {
		t.Error("an order id appears in a metric label")
	}
}

// Consumer lag is what a stalled participant has not committed: it grows
// while payment is held inside its transaction and is back to 0 once
// payment catches up.
func TestConsumerLagMetric(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	release := holdPayment(t, &cfg)
	r := e.start(cfg)
	admin := "http://" + r.sys.AdminAddr() + "/metrics"
	lag := func() float64 {
		return mustValue(t, scrape(t, admin), `prozess_consumer_lag_records{participant="payment"}`)
	}
	var ids []string
	for range 3 {
		ids = append(ids, r.order(t, "u1", "", mouse(1)).OrderID.String())
	}
	deadline := time.Now().Add(15 * time.Second)
	for lag() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("payment's lag is %v with payment stalled and 3 orders reserved, want >= 3", lag())
		}
		time.Sleep(50 * time.Millisecond)
	}
	release()
	for _, id := range ids {
		r.await(t, id, 15*time.Second)
	}
	deadline = time.Now().Add(15 * time.Second)
	for lag() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("payment's lag still %v after it caught up", lag())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
