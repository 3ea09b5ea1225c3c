package saga

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

// StartBroker starts franz-go's kfake, a Kafka-protocol broker, on addr with
// its data in dataDir, so a restart loses nothing. It is the development and
// test broker; production uses real Kafka.
func StartBroker(addr, dataDir string, log *slog.Logger) (*kfake.Cluster, error) {
	if dataDir == "" {
		return nil, errors.New("the embedded broker needs a data directory (--data-dir)")
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating broker data directory %s: %w", dataDir, err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("embedded broker cannot listen on %s: %w", addr, err)
	}
	used := false
	c, err := kfake.NewCluster(
		kfake.NumBrokers(1),
		kfake.DataDir(dataDir),
		kfake.ListenFn(func(string, string) (net.Listener, error) {
			if used {
				return nil, errors.New("the embedded broker has one listener")
			}
			used = true
			return ln, nil
		}),
	)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("starting embedded broker (data in %s): %w", dataDir, err)
	}
	log.Info("embedded kafka broker started", "addr", c.ListenAddrs()[0], "data_dir", dataDir)
	return c, nil
}

// EnsureTopics creates the saga topic and its dead-letter topic if they are
// missing. Creating them explicitly (not by auto-creation) is what makes
// kfake persist them at once, and lets us choose the partition count.
func EnsureTopics(ctx context.Context, brokers []string, partitions int32, topics ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return fmt.Errorf("creating kafka admin client: %w", err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	res, err := adm.CreateTopics(ctx, partitions, -1, nil, topics...)
	if err != nil {
		return fmt.Errorf("cannot reach Kafka at %v: %w", brokers, err)
	}
	for _, t := range res.Sorted() {
		if t.Err != nil && !errors.Is(t.Err, kerr.TopicAlreadyExists) {
			return fmt.Errorf("creating topic %s: %w", t.Topic, t.Err)
		}
	}
	return nil
}
