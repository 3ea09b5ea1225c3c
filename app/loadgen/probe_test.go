package loadgen_test

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/prozess/prozess/app/loadgen"
	"github.com/prozess/prozess/app/saga"
)

// TestProbeTimesEveryRecord probes a real Kafka-protocol broker (kfake):
// every record sent is acknowledged and consumed, both latencies are
// measured over all of them, and the probe's topic is gone afterwards.
func TestProbeTimesEveryRecord(t *testing.T) {
	b, err := saga.StartBroker("127.0.0.1:0", t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	conn := saga.Conn{Brokers: b.ListenAddrs()}
	res, err := loadgen.Probe(t.Context(), loadgen.ProbeConfig{Kafka: conn, Rate: 100, Duration: time.Second, Partitions: 3})
	if err != nil {
		t.Fatal(err)
	}
	if res.Sent != 100 || res.Received != 100 || res.Produce.Count != 100 || res.EndToEnd.Count != 100 {
		t.Fatalf("sent %d, consumed %d, timed %d produced and %d consumed; want 100 of each", res.Sent, res.Received, res.Produce.Count, res.EndToEnd.Count)
	}
	if res.Produce.P50 <= 0 || res.EndToEnd.P50 <= 0 || res.EndToEnd.Max > 10*time.Second {
		t.Errorf("latencies produce %+v, produce-to-consume %+v", res.Produce, res.EndToEnd)
	}
	cl, err := conn.Client()
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	topics, err := kadm.NewClient(cl).ListTopics(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for name := range topics {
		if strings.HasPrefix(name, "prozess-probe-") {
			t.Errorf("probe topic %s left behind", name)
		}
	}
}
