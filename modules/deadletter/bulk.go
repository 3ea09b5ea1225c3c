package deadletter

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/event"
)

// Filter chooses the dead letters, or the parked records, a bulk re-drive
// puts back. Every field given must match; an empty filter matches
// everything not re-driven yet. The same filter serves the admin endpoints
// and `prozess dlq replay`/`dlq unpark`, so an operator can try on the
// command line what the live page's "re-drive all matching" would do.
type Filter struct {
	// Participant: for a dead letter, the participant that dead-lettered
	// it; for a parked record, the one that emitted it (its ce_source).
	Participant string `json:"participant,omitempty"`
	// EventType is the record's ce_type.
	EventType string `json:"event_type,omitempty"`
	// Reason matches when the reason (the participant's error, or the
	// broker's for a parked record) contains it, ignoring case.
	Reason string `json:"reason,omitempty"`
	// Since and Until bound when it was dead-lettered (parked):
	// Since <= at < Until.
	Since *time.Time `json:"since,omitempty"`
	Until *time.Time `json:"until,omitempty"`
	// OrderID is the order the record is about (its key).
	OrderID *uuid.UUID `json:"order_id,omitempty"`
	// IDs names the records one by one (dead letter ids; parked records'
	// outbox ids).
	IDs []int64 `json:"ids,omitempty"`
	// ThroughID leaves out records with a higher id: a dry run answers
	// the highest id it listed, and the run that follows passes it, so it
	// re-drives what the dry run showed and not what failed since.
	ThroughID int64 `json:"through_id,omitempty"`
}

// MaxIDs bounds Filter.IDs.
const MaxIDs = 1000

// FilterError is a filter that cannot be applied: Field names the
// offending field, as the JSON body and the command's flag name it.
// Window marks a filter whose fields are each well-formed but whose time
// window is empty (until not after since): the API answers that 422, as a
// request it understands and will not run, rather than 400.
type FilterError struct {
	Field   string
	Message string
	Window  bool
}

func (e *FilterError) Error() string { return e.Field + ": " + e.Message }

var typePattern = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)

// Validate refuses a filter that could only match by accident: a
// participant that is not one of participants (when given), an event type
// or reason that is not printable or too long, a time window that ends
// before it starts, ids that are not positive.
func (f Filter) Validate(participants []string) error {
	if f.Participant != "" && (len(participants) > 0 && !slices.Contains(participants, f.Participant) || !typePattern.MatchString(f.Participant)) {
		return &FilterError{Field: "participant", Message: fmt.Sprintf("%q is not a participant (%s)", f.Participant, strings.Join(participants, ", "))}
	}
	if f.EventType != "" && !typePattern.MatchString(f.EventType) {
		return &FilterError{Field: "event_type", Message: "must be 1 to 128 letters, digits and ._:- (a ce_type, e.g. PaymentCompleted)"}
	}
	if f.Reason != "" && (utf8.RuneCountInString(f.Reason) > 500 || printable(f.Reason) != f.Reason) {
		// Characters, not bytes, as the document's maxLength counts them.
		return &FilterError{Field: "reason", Message: "must be at most 500 characters of UTF-8 text without NUL"}
	}
	if f.Since != nil && f.Until != nil && !f.Since.Before(*f.Until) {
		return &FilterError{Field: "until", Message: "must be after since", Window: true}
	}
	if f.OrderID != nil && *f.OrderID == uuid.Nil {
		return &FilterError{Field: "order_id", Message: "must be an order id"}
	}
	if len(f.IDs) > MaxIDs {
		return &FilterError{Field: "ids", Message: fmt.Sprintf("at most %d ids at a time", MaxIDs)}
	}
	for _, id := range f.IDs {
		if id <= 0 {
			return &FilterError{Field: "ids", Message: "ids must be positive integers"}
		}
	}
	if f.ThroughID < 0 {
		return &FilterError{Field: "through_id", Message: "must be a positive integer"}
	}
	return nil
}

// where is f as SQL conditions on a table whose columns for the reason,
// the time and the order are given, with args numbered after those in
// args. The participant and type of parked records are in their encoded
// headers, so the caller matches those (skip); dead letters have columns.
func (f Filter) where(reason, at, order string, orderArg func(uuid.UUID) any, args []any, skip bool) (string, []any) {
	conds := []string{"true"}
	arg := func(v any) string { args = append(args, v); return "$" + strconv.Itoa(len(args)) }
	if !skip && f.Participant != "" {
		conds = append(conds, "participant = "+arg(f.Participant))
	}
	if !skip && f.EventType != "" {
		conds = append(conds, "event_type = "+arg(f.EventType))
	}
	if f.Reason != "" {
		conds = append(conds, "strpos(lower("+reason+"), lower("+arg(f.Reason)+")) > 0")
	}
	if f.Since != nil {
		conds = append(conds, at+" >= "+arg(*f.Since))
	}
	if f.Until != nil {
		conds = append(conds, at+" < "+arg(*f.Until))
	}
	if f.OrderID != nil {
		conds = append(conds, order+" = "+arg(orderArg(*f.OrderID)))
	}
	if len(f.IDs) > 0 {
		conds = append(conds, "id = ANY("+arg(f.IDs)+")")
	}
	if f.ThroughID > 0 {
		conds = append(conds, "id <= "+arg(f.ThroughID))
	}
	return strings.Join(conds, " AND "), args
}

// Bulk is what a bulk re-drive did, or, for a dry run, would do.
type Bulk struct {
	DryRun bool `json:"dry_run"`
	// Matched counts every record the filter matches that was not
	// re-driven yet; Count those this run re-drove (would re-drive), at
	// most its limit, oldest first; More says Matched > Count.
	Matched int  `json:"matched"`
	Count   int  `json:"count"`
	More    bool `json:"more"`
	// ThroughID is the highest id of this run's records: pass it as
	// filter.through_id to re-drive just what a dry run listed.
	ThroughID   int64      `json:"through_id,omitempty"`
	DeadLetters []Entry    `json:"dead_letters,omitempty"`
	Parked      []Unparked `json:"parked,omitempty"`
	// RedriveID is the audit row (table redrives) of a run that
	// re-drove something, with By and At.
	RedriveID int64      `json:"redrive_id,omitempty"`
	By        string     `json:"by,omitempty"`
	At        *time.Time `json:"at,omitempty"`
}

// RedriveMatching re-drives, oldest first, up to limit dead letters that
// f matches and that were not re-driven yet, as Redrive does each one,
// all in one transaction that also writes the audit row (who, when, the
// filter, the ids). With dryRun it only reads: what would be re-driven,
// guard included (a dead letter too old to replay fails the dry run as it
// would fail the run). Each dead letter is re-driven at most once however
// many runs race: the rows are locked and rechecked before they are
// marked.
func RedriveMatching(ctx context.Context, pool *pgxpool.Pool, f Filter, limit int, dryRun bool, by string,
	guard func(age time.Duration) error) (Bulk, error) {
	res := Bulk{DryRun: dryRun}
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		cond, args := f.where("reason", "dead_at", "order_id", func(id uuid.UUID) any { return id }, nil, false)
		cond += " AND replayed_at IS NULL"
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM dead_letters WHERE `+cond, args...).Scan(&res.Matched); err != nil {
			return fmt.Errorf("counting matching dead letters: %w", err)
		}
		lock := " FOR UPDATE"
		if dryRun {
			lock = ""
		}
		rows, err := tx.Query(ctx, `SELECT `+entryColumns+`, topic, key, value, header_bytes FROM dead_letters WHERE `+cond+
			` ORDER BY id LIMIT `+strconv.Itoa(limit)+lock, args...)
		if err != nil {
			return fmt.Errorf("reading matching dead letters: %w", err)
		}
		type dl struct {
			e                  Entry
			topic              string
			key, value, header []byte
		}
		var dls []dl
		var d dl
		_, err = pgx.ForEachRow(rows, []any{&d.e.ID, &d.e.OrderID, &d.e.Participant, &d.e.Reason, &d.e.Type, &d.e.At, &d.e.ReplayedAt,
			&d.e.ReplayedBy, &d.topic, &d.key, &d.value, &d.header}, func() error {
			d.e.Code = Code(d.e.Reason)
			dls = append(dls, d)
			d = dl{}
			return nil
		})
		if err != nil {
			return fmt.Errorf("reading matching dead letters: %w", err)
		}
		res.Count, res.More = len(dls), res.Matched > len(dls)
		res.DeadLetters = make([]Entry, 0, len(dls))
		ids := make([]int64, 0, len(dls))
		for _, d := range dls {
			res.ThroughID = max(res.ThroughID, d.e.ID)
			ids = append(ids, d.e.ID)
		}
		if dryRun || len(dls) == 0 {
			for _, d := range dls {
				if err := checkAge(d.e, d.header, guard); err != nil {
					return err
				}
				res.DeadLetters = append(res.DeadLetters, d.e)
			}
			return nil
		}
		if err := audit(ctx, tx, &res, "dead_letters", by, f, ids); err != nil {
			return err
		}
		for _, d := range dls {
			if err := redrive(ctx, tx, &d.e, d.topic, d.key, d.value, d.header, by, res.RedriveID, guard); err != nil {
				return err
			}
			res.DeadLetters = append(res.DeadLetters, d.e)
		}
		return wakeRelay(ctx, tx)
	})
	if err != nil {
		return Bulk{}, err
	}
	return res, nil
}

// UnparkMatching sends again, oldest first, up to limit parked records
// that f matches, as Unpark does each one, in one transaction that also
// writes the audit row. With dryRun it only reads.
func UnparkMatching(ctx context.Context, pool *pgxpool.Pool, f Filter, limit int, dryRun bool, by string) (Bulk, error) {
	res := Bulk{DryRun: dryRun}
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		cond, args := f.where("error", "parked_at", "key", func(id uuid.UUID) any { return []byte(id.String()) }, nil, true)
		lock := " FOR UPDATE"
		if dryRun {
			lock = ""
		}
		// The participant and type are in the encoded headers: matched
		// here, over the rows the SQL conditions leave (parked records are
		// few: the broker refused them for good).
		rows, err := tx.Query(ctx, `SELECT id, topic, key, headers, header_bytes, error, parked_at FROM parked WHERE `+cond+` ORDER BY id`+lock, args...)
		if err != nil {
			return fmt.Errorf("reading matching parked records: %w", err)
		}
		var key, headers, headerBytes []byte
		var u Unparked
		var match []Unparked
		_, err = pgx.ForEachRow(rows, []any{&u.ParkedID, &u.Topic, &key, &headers, &headerBytes, &u.Reason, &u.ParkedAt}, func() error {
			hs, err := event.OutboxHeaders(headerBytes, headers)
			if err != nil {
				return fmt.Errorf("parked record %d: %w", u.ParkedID, err)
			}
			source := ""
			u.Type = ""
			for _, h := range hs {
				switch h.Key {
				case "ce_type":
					u.Type = string(h.Value)
				case "ce_source":
					source = event.SourceName(string(h.Value))
				}
			}
			if f.Participant != "" && source != f.Participant || f.EventType != "" && u.Type != f.EventType {
				return nil
			}
			u.OrderID = nil
			if id, err := uuid.ParseBytes(key); err == nil {
				u.OrderID = &id
			}
			match = append(match, u)
			return nil
		})
		if err != nil {
			return fmt.Errorf("reading matching parked records: %w", err)
		}
		res.Matched = len(match)
		match = match[:min(len(match), limit)]
		res.Count, res.More = len(match), res.Matched > len(match)
		res.Parked = make([]Unparked, 0, len(match))
		ids := make([]int64, 0, len(match))
		for _, u := range match {
			res.ThroughID = max(res.ThroughID, u.ParkedID)
			ids = append(ids, u.ParkedID)
		}
		if dryRun || len(match) == 0 {
			res.Parked = append(res.Parked, match...)
			return nil
		}
		if err := audit(ctx, tx, &res, "parked", by, f, ids); err != nil {
			return err
		}
		for _, m := range match {
			u, err := unpark(ctx, tx, m.ParkedID, by, res.RedriveID)
			if err != nil {
				return err
			}
			res.Parked = append(res.Parked, u)
		}
		return wakeRelay(ctx, tx)
	})
	if err != nil {
		return Bulk{}, err
	}
	return res, nil
}

// audit writes the run's row in redrives and notes it in res.
func audit(ctx context.Context, tx pgx.Tx, res *Bulk, kind, by string, f Filter, ids []int64) error {
	filter, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("encoding the filter: %w", err)
	}
	var at time.Time
	if err := tx.QueryRow(ctx, `INSERT INTO redrives (kind, done_by, filter, ids, count) VALUES ($1, $2, $3, $4, $5) RETURNING id, done_at`,
		kind, by, filter, ids, len(ids)).Scan(&res.RedriveID, &at); err != nil {
		return fmt.Errorf("recording the re-drive: %w", err)
	}
	res.By, res.At = by, &at
	return nil
}

// wakeRelay tells the relay, wherever it runs, that the outbox has rows
// (at commit: a bulk re-drive is rare, so its NOTIFY costs nothing).
func wakeRelay(ctx context.Context, tx pgx.Tx) error {
	if _, err := tx.Exec(ctx, `SELECT pg_notify('prozess_outbox', '')`); err != nil {
		return fmt.Errorf("waking the relay: %w", err)
	}
	return nil
}

// checkAge applies guard to a dead letter's event age (see Age).
func checkAge(e Entry, headerBytes []byte, guard func(time.Duration) error) error {
	if guard == nil {
		return nil
	}
	hs, err := event.DecodeHeaders(headerBytes)
	if err != nil {
		return fmt.Errorf("dead letter %d: %w", e.ID, err)
	}
	return ageOK(e, hs, guard)
}

func ageOK(e Entry, hs []kgo.RecordHeader, guard func(time.Duration) error) error {
	if guard == nil {
		return nil
	}
	ceTime := ""
	for _, h := range hs {
		if h.Key == "ce_time" {
			ceTime = string(h.Value)
		}
	}
	if err := guard(Age(ceTime, e.At)); err != nil {
		return &RefusedError{ID: e.ID, Err: err}
	}
	return nil
}

// FilterText is a Filter as a person or a JSON body writes it: times in
// RFC 3339, the order id as text.
type FilterText struct {
	Participant string  `json:"participant,omitempty"`
	EventType   string  `json:"event_type,omitempty"`
	Reason      string  `json:"reason,omitempty"`
	Since       string  `json:"since,omitempty"`
	Until       string  `json:"until,omitempty"`
	OrderID     string  `json:"order_id,omitempty"`
	IDs         []int64 `json:"ids,omitempty"`
	ThroughID   int64   `json:"through_id,omitempty"`
}

// Parse reads and validates t (see Filter.Validate); a *FilterError names
// the field at fault.
func (t FilterText) Parse(participants []string) (Filter, error) {
	f := Filter{Participant: t.Participant, EventType: t.EventType, Reason: t.Reason, IDs: t.IDs, ThroughID: t.ThroughID}
	for _, tm := range []struct {
		field, text string
		to          **time.Time
	}{{"since", t.Since, &f.Since}, {"until", t.Until, &f.Until}} {
		if tm.text == "" {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, tm.text)
		if err != nil {
			return Filter{}, &FilterError{Field: tm.field, Message: fmt.Sprintf("%q is not an RFC 3339 time (e.g. 2026-01-02T15:04:05Z)", tm.text)}
		}
		*tm.to = &at
	}
	if t.OrderID != "" {
		id, err := uuid.Parse(t.OrderID)
		if err != nil {
			return Filter{}, &FilterError{Field: "order_id", Message: fmt.Sprintf("%q is not an order id (a UUID)", t.OrderID)}
		}
		f.OrderID = &id
	}
	return f, f.Validate(participants)
}
