package event

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Execer is the part of a pgx transaction the outbox needs.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Emit appends events to the outbox inside the caller's transaction, so an
// event exists exactly when the business write that caused it commits.
func Emit(ctx context.Context, tx Execer, topic string, evs ...Event) error {
	recs := make([]*kgo.Record, len(evs))
	for i, e := range evs {
		recs[i] = e.Record(topic)
	}
	return WriteOutbox(ctx, tx, recs...)
}

// WriteOutbox appends raw records (events, or dead letters) to the outbox in
// one statement. The relay publishes outbox rows in id order and deletes them
// once the broker has acknowledged them.
func WriteOutbox(ctx context.Context, tx Execer, recs ...*kgo.Record) error {
	if len(recs) == 0 {
		return nil
	}
	topics := make([]string, len(recs))
	keys := make([][]byte, len(recs))
	values := make([][]byte, len(recs))
	headers := make([]string, len(recs))
	for i, r := range recs {
		topics[i], keys[i], values[i] = r.Topic, r.Key, r.Value
		hs := make([][2]string, len(r.Headers))
		for j, h := range r.Headers {
			hs[j] = [2]string{h.Key, string(h.Value)}
		}
		b, err := json.Marshal(hs)
		if err != nil {
			return fmt.Errorf("encoding record headers: %w", err)
		}
		headers[i] = string(b)
	}
	_, err := tx.Exec(ctx, `
		INSERT INTO outbox (topic, key, value, headers)
		SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::jsonb[])`,
		topics, keys, values, headers)
	if err != nil {
		return fmt.Errorf("writing %d records to the outbox: %w", len(recs), err)
	}
	return nil
}

// Headers decodes the outbox's JSON headers back into record headers.
func Headers(raw []byte) ([]kgo.RecordHeader, error) {
	var hs [][2]string
	if err := json.Unmarshal(raw, &hs); err != nil {
		return nil, fmt.Errorf("decoding outbox headers: %w", err)
	}
	out := make([]kgo.RecordHeader, len(hs))
	for i, h := range hs {
		out[i] = kgo.RecordHeader{Key: h[0], Value: []byte(h[1])}
	}
	return out, nil
}
