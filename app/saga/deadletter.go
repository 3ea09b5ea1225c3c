package saga

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Dead-letter headers, beside the original record's own.
const (
	HeaderDLQReason      = "prozess_dlq_reason"
	HeaderDLQParticipant = "prozess_dlq_participant"
	HeaderDLQTopic       = "prozess_dlq_topic"
	HeaderDLQPartition   = "prozess_dlq_partition"
	HeaderDLQOffset      = "prozess_dlq_offset"
	HeaderDLQTime        = "prozess_dlq_time"
	// HeaderReplayOf marks a record `prozess dlq replay` put back, with the
	// dead letter it came from (PARTITION@OFFSET): the participant that
	// dead-lettered it applies it then.
	HeaderReplayOf = deadletter.HeaderReplayOf
)

// isReplay reports whether r was put back by a replay.
func isReplay(r *kgo.Record) bool {
	for _, h := range r.Headers {
		if h.Key == HeaderReplayOf {
			return true
		}
	}
	return false
}

// DeadLetter is one record of the dead-letter topic.
type DeadLetter struct {
	// ID is its row in PostgreSQL's dead_letters (deadletter.HeaderID); 0
	// for dead letters written before the table.
	ID          int64             `json:"id,omitempty"`
	Partition   int32             `json:"partition"`
	Offset      int64             `json:"offset"`
	Reason      string            `json:"reason"`
	Participant string            `json:"participant"`
	Origin      string            `json:"origin"` // topic/partition@offset
	Time        string            `json:"time"`
	Type        string            `json:"type"`
	Key         string            `json:"key"`
	Headers     map[string]string `json:"-"`
	record      *kgo.Record
}

// ReadDeadLetters reads the whole dead-letter topic, start to end, into
// memory (for dlq list; replay streams it with ScanDeadLetters): each wait
// is bounded, not the whole read.
func ReadDeadLetters(ctx context.Context, conn Conn, topic string) ([]DeadLetter, error) {
	var out []DeadLetter
	err := ScanDeadLetters(ctx, conn, topic, 1000, func(dls []DeadLetter) error {
		out = append(out, dls...)
		return nil
	})
	return out, err
}

// ParseDeadLetter reads a record of the dead-letter topic.
func ParseDeadLetter(r *kgo.Record) DeadLetter {
	h := map[string]string{}
	for _, kv := range r.Headers {
		h[kv.Key] = string(kv.Value)
	}
	id, _ := strconv.ParseInt(h[deadletter.HeaderID], 10, 64)
	return DeadLetter{
		ID: id, Partition: r.Partition, Offset: r.Offset, Reason: h[HeaderDLQReason], Participant: h[HeaderDLQParticipant],
		Origin: h[HeaderDLQTopic] + "/" + h[HeaderDLQPartition] + "@" + h[HeaderDLQOffset], Time: h[HeaderDLQTime],
		Type: h["ce_type"], Key: string(r.Key), Headers: h, record: r,
	}
}

// At is when the record was dead-lettered (zero if its header is missing
// or malformed).
func (d DeadLetter) At() time.Time {
	at, _ := time.Parse(time.RFC3339Nano, d.Time)
	return at
}

// Age is how long ago the dead-lettered event happened: its ce_time, or,
// without one, when it was dead-lettered. Participants that applied it
// remember its id in their inboxes only for so long.
func (d DeadLetter) Age() time.Duration { return deadletter.Age(d.Headers["ce_time"], d.At()) }

// Original is the record as it was before it was dead-lettered: its topic,
// key, value and headers without the dead-letter ones.
func (d DeadLetter) Original() *kgo.Record {
	var hs []kgo.RecordHeader
	for _, h := range d.record.Headers {
		if !strings.HasPrefix(h.Key, "prozess_dlq_") && h.Key != HeaderReplayOf {
			hs = append(hs, h)
		}
	}
	hs = append(hs, kgo.RecordHeader{Key: HeaderReplayOf, Value: fmt.Appendf(nil, "%d@%d", d.Partition, d.Offset)})
	return &kgo.Record{Topic: d.Headers[HeaderDLQTopic], Key: d.record.Key, Value: d.record.Value, Headers: hs}
}

// Parked is an outbox record the broker refused for good, kept in
// PostgreSQL with the broker's error.
type Parked struct {
	ID       int64     `json:"outbox_id"`
	Topic    string    `json:"topic"`
	Key      string    `json:"key"`
	Type     string    `json:"type"`
	Bytes    int       `json:"bytes"`
	Error    string    `json:"error"`
	ParkedAt time.Time `json:"parked_at"`
}

// ReadParked lists the parked records, oldest first.
func ReadParked(ctx context.Context, pool *pgxpool.Pool) ([]Parked, error) {
	rows, err := pool.Query(ctx, `
		SELECT id, topic, coalesce(key, ''), coalesce(length(value), 0), headers, header_bytes, error, parked_at
		FROM parked ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("reading parked records: %w", err)
	}
	var out []Parked
	var p Parked
	var key, headers, headerBytes []byte
	_, err = pgx.ForEachRow(rows, []any{&p.ID, &p.Topic, &key, &p.Bytes, &headers, &headerBytes, &p.Error, &p.ParkedAt}, func() error {
		hs, err := event.OutboxHeaders(headerBytes, headers)
		if err != nil {
			return fmt.Errorf("parked record %d: %w", p.ID, err)
		}
		p.Key, p.Type = string(key), ""
		for _, h := range hs {
			if h.Key == "ce_type" {
				p.Type = string(h.Value)
			}
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading parked records: %w", err)
	}
	return out, nil
}
