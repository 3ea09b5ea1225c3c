package saga

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
)

// StartBroker starts franz-go's kfake, a Kafka-protocol broker, on addr with
// its data in dataDir, so a restart loses nothing. It is the development and
// test broker; production uses real Kafka.
func StartBroker(addr, dataDir string, log *slog.Logger) (*kfake.Cluster, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("embedded broker cannot listen on %s: %w", addr, err)
	}
	return StartBrokerOn(ln, dataDir, log)
}

// StartBrokerOn is StartBroker on a listener the caller chose (serve all's
// usual port, or a free one when that is taken); the broker closes it.
func StartBrokerOn(ln net.Listener, dataDir string, log *slog.Logger) (*kfake.Cluster, error) {
	if dataDir == "" {
		ln.Close()
		return nil, errors.New("the embedded broker needs a data directory (--data-dir)")
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		ln.Close()
		return nil, fmt.Errorf("creating broker data directory %s: %w", dataDir, err)
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

// Topics is what EnsureTopics creates and checks: the saga topic, its
// dead-letter topic and how durable they must be.
type Topics struct {
	Topic, DLQ string
	Partitions int32
	// ReplicationFactor is each partition's copies: 0 means 3, or the
	// number of brokers when there are fewer.
	ReplicationFactor int16
	// MinInSync is min.insync.replicas, the copies an acks=all write must
	// reach: 0 means the replication factor less one, at least 1.
	MinInSync int
	// DLQRetention is how long dead letters are kept: 0 keeps them until an
	// operator removes them, since a dead letter is there to be replayed.
	DLQRetention time.Duration
	// Strict refuses existing topics less durable than asked for, instead
	// of warning.
	Strict bool
}

// durability resolves 0s against a cluster of n brokers.
func (t Topics) durability(n int) (rf int16, minISR int, err error) {
	rf = t.ReplicationFactor
	if rf <= 0 {
		rf = int16(min(3, max(n, 1)))
	}
	if int(rf) > n {
		return 0, 0, fmt.Errorf("--replication-factor %d: the cluster has %d brokers", rf, n)
	}
	minISR = t.MinInSync
	if minISR <= 0 {
		minISR = max(1, int(rf)-1)
	}
	if minISR > int(rf) {
		return 0, 0, fmt.Errorf("--min-insync-replicas %d: above the replication factor %d, so no write could succeed", minISR, rf)
	}
	return rf, minISR, nil
}

// EnsureTopics creates the saga topic and its dead-letter topic if they are
// missing, durable: replicated, with min.insync.replicas so that acks=all
// means more than the leader alone, and dead letters kept until replayed.
// Creating them explicitly (not by auto-creation) is also what makes kfake
// persist them at once. Existing topics less durable than asked for are
// reported in one line, or refused when t.Strict.
func EnsureTopics(ctx context.Context, conn Conn, t Topics, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	cl, err := conn.Client()
	if err != nil {
		return fmt.Errorf("creating kafka admin client: %w", err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	bs, err := adm.ListBrokers(ctx)
	if err != nil {
		return fmt.Errorf("cannot reach Kafka at %v: %w", conn.Brokers, err)
	}
	rf, minISR, err := t.durability(len(bs))
	if err != nil {
		return err
	}
	isr := strconv.Itoa(minISR)
	configs := map[string]map[string]*string{
		t.Topic: {"min.insync.replicas": &isr},
		t.DLQ:   {"min.insync.replicas": &isr, "retention.ms": ptr(retentionMs(t.DLQRetention)), "retention.bytes": ptr("-1")},
	}
	var existing []string
	for _, topic := range []string{t.Topic, t.DLQ} {
		res, err := adm.CreateTopic(ctx, t.Partitions, rf, configs[topic], topic)
		switch {
		case errors.Is(err, kerr.TopicAlreadyExists) || errors.Is(res.Err, kerr.TopicAlreadyExists):
			existing = append(existing, topic)
		case err != nil:
			return fmt.Errorf("creating topic %s: %w", topic, err)
		case res.Err != nil:
			return fmt.Errorf("creating topic %s: %w", topic, res.Err)
		default:
			log.Info("topic created", "topic", topic, "partitions", t.Partitions, "replication_factor", rf, "min_insync_replicas", minISR)
		}
	}
	if len(existing) == 0 {
		return nil
	}
	problems, err := checkTopics(ctx, adm, existing, rf, minISR, t.DLQ, retentionMs(t.DLQRetention))
	if err != nil {
		return err
	}
	for _, p := range problems {
		if t.Strict {
			return fmt.Errorf("%s (--strict-topics refuses it: raise it with kafka-topics/kafka-configs or drop the flag)", p)
		}
		log.Warn(p + "; acknowledged writes can be lost with one broker (--strict-topics refuses to start on this)")
	}
	return nil
}

// checkTopics compares existing topics with the durability asked for and
// says, one line a topic, where they fall short.
func checkTopics(ctx context.Context, adm *kadm.Client, topics []string, rf int16, minISR int, dlq, dlqRetention string) ([]string, error) {
	// A topic another process has just created can answer without
	// partitions, with LEADER_NOT_AVAILABLE or without configs for a moment.
	var md kadm.Metadata
	err := until(ctx, "describing topics", topics, func() (bool, error) {
		var err error
		if md, err = adm.Metadata(ctx, topics...); err != nil {
			return false, err
		}
		for _, topic := range topics {
			if td := md.Topics[topic]; td.Err != nil || len(td.Partitions) == 0 {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	var cfgs kadm.ResourceConfigs
	err = until(ctx, "describing topic configs", topics, func() (bool, error) {
		var err error
		if cfgs, err = adm.DescribeTopicConfigs(ctx, topics...); err != nil {
			return false, err
		}
		for _, topic := range topics {
			if rc, err := cfgs.On(topic, nil); err != nil || len(rc.Configs) == 0 {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, topic := range topics {
		td, ok := md.Topics[topic]
		if !ok || td.Err != nil {
			return nil, fmt.Errorf("describing topic %s: %v", topic, td.Err)
		}
		have := int16(1 << 14)
		for _, p := range td.Partitions {
			have = min(have, int16(len(p.Replicas)))
		}
		rc, err := cfgs.On(topic, nil)
		if err != nil {
			return nil, fmt.Errorf("describing topic %s: %w", topic, err)
		}
		values := map[string]string{}
		for _, c := range rc.Configs {
			values[c.Key] = c.MaybeValue()
		}
		haveISR, _ := strconv.Atoi(values["min.insync.replicas"])
		var short []string
		if have < rf {
			short = append(short, fmt.Sprintf("replication factor %d (want %d)", have, rf))
		}
		if haveISR < minISR {
			short = append(short, fmt.Sprintf("min.insync.replicas %d (want %d)", haveISR, minISR))
		}
		if topic == dlq && values["retention.ms"] != dlqRetention {
			short = append(short, fmt.Sprintf("retention.ms %s (want %s: dead letters must outlive their replay)", values["retention.ms"], dlqRetention))
		}
		if len(short) > 0 {
			out = append(out, fmt.Sprintf("topic %s is less durable than configured: %s", topic, strings.Join(short, ", ")))
		}
	}
	return out, nil
}

// until asks ready every 100 ms until it says yes, fails, or ctx ends.
func until(ctx context.Context, what string, topics []string, ready func() (bool, error)) error {
	for {
		ok, err := ready()
		if err != nil {
			return fmt.Errorf("%s %v: %w", what, topics, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s %v: not ready: %w", what, topics, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func retentionMs(d time.Duration) string {
	if d <= 0 {
		return "-1"
	}
	return strconv.FormatInt(d.Milliseconds(), 10)
}

func ptr(s string) *string { return &s }
