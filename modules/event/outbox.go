package event

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
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
// one statement, their headers byte-exact. The relay publishes outbox rows in
// id order and deletes them once the broker has acknowledged them.
func WriteOutbox(ctx context.Context, tx Execer, recs ...*kgo.Record) error {
	if len(recs) == 0 {
		return nil
	}
	topics := make([]string, len(recs))
	keys := make([][]byte, len(recs))
	values := make([][]byte, len(recs))
	headers := make([][]byte, len(recs))
	for i, r := range recs {
		topics[i], keys[i], values[i], headers[i] = r.Topic, r.Key, r.Value, EncodeHeaders(r.Headers)
	}
	_, err := tx.Exec(ctx, `
		INSERT INTO outbox (topic, key, value, header_bytes)
		SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::bytea[])`,
		topics, keys, values, headers)
	if err != nil {
		return fmt.Errorf("writing %d records to the outbox: %w", len(recs), err)
	}
	return nil
}

// EncodeHeaders writes record headers byte for byte: for each, its key's
// and its value's length as uvarints, each followed by its bytes. Any bytes
// survive, NUL and invalid UTF-8 included.
func EncodeHeaders(hs []kgo.RecordHeader) []byte {
	var b []byte
	for _, h := range hs {
		b = binary.AppendUvarint(b, uint64(len(h.Key)))
		b = append(b, h.Key...)
		b = binary.AppendUvarint(b, uint64(len(h.Value)))
		b = append(b, h.Value...)
	}
	return b
}

// DecodeHeaders reads what EncodeHeaders wrote.
func DecodeHeaders(b []byte) ([]kgo.RecordHeader, error) {
	var hs []kgo.RecordHeader
	next := func() ([]byte, error) {
		n, used := binary.Uvarint(b)
		if used <= 0 || uint64(len(b)-used) < n {
			return nil, errors.New("truncated record headers")
		}
		out := b[used : used+int(n)]
		b = b[used+int(n):]
		return out, nil
	}
	for len(b) > 0 {
		k, err := next()
		if err != nil {
			return nil, err
		}
		v, err := next()
		if err != nil {
			return nil, err
		}
		hs = append(hs, kgo.RecordHeader{Key: string(k), Value: bytes.Clone(v)})
	}
	return hs, nil
}

// OutboxHeaders decodes an outbox (or parked) row's headers: header_bytes,
// or, for rows written before that column, the JSON headers.
func OutboxHeaders(headerBytes, jsonHeaders []byte) ([]kgo.RecordHeader, error) {
	if headerBytes == nil {
		return jsonHeadersOf(jsonHeaders)
	}
	return DecodeHeaders(headerBytes)
}

// jsonHeadersOf decodes the JSON headers of outbox rows written before
// header_bytes.
func jsonHeadersOf(raw []byte) ([]kgo.RecordHeader, error) {
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
