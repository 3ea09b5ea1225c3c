package saga_test

import (
	"fmt"
	"log/slog"
	"slices"
	"testing"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
)

// The dead-letter topic is handed over in batches of the size asked for,
// start to end, never read whole into memory.
func TestScanDeadLettersInBatches(t *testing.T) {
	t.Parallel()
	b, err := saga.StartBroker("127.0.0.1:0", t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const topic = "scan.dlq"
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.ListenAddrs()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := kadm.NewClient(cl).CreateTopic(t.Context(), 2, 1, nil, topic); err != nil {
		t.Fatal(err)
	}
	for i := range 7 {
		if err := cl.ProduceSync(t.Context(), &kgo.Record{Topic: topic, Key: []byte(fmt.Sprint(i)), Value: []byte("v")}).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
	var sizes []int
	var keys []string
	err = saga.ScanDeadLetters(t.Context(), saga.Conn{Brokers: b.ListenAddrs()}, topic, 3, func(dls []saga.DeadLetter) error {
		sizes = append(sizes, len(dls))
		for _, d := range dls {
			keys = append(keys, d.Key)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(keys)
	if !slices.Equal(keys, []string{"0", "1", "2", "3", "4", "5", "6"}) || slices.Max(sizes) > 3 || len(sizes) < 3 {
		t.Fatalf("batches of %v with keys %v, want the 7 records in batches of at most 3", sizes, keys)
	}
}
