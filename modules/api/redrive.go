package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/prozess/prozess/modules/deadletter"
)

// RedriveResponse is the answer to POST /admin/dead-letters/{id}/replay.
type RedriveResponse struct {
	DeadLetter deadletter.Entry `json:"dead_letter"`
}

// redrive puts a dead letter back on its topic, as `prozess dlq replay`
// does, through the outbox (see deadletter.Redrive): the participant that
// dead-lettered it applies it, and the order's trail records who re-drove
// it. Admins only; for any other key the endpoint does not exist (404).
func (a *API) redrive(c echo.Context) error {
	p := principal(c)
	if !p.Admin {
		return errNotFound
	}
	id, err := strconv.ParseInt(c.Param("id"), 10, 64)
	if err != nil || id <= 0 {
		return badRequest("invalid_dead_letter_id", "the dead letter id must be a positive integer, as GET /orders/{id} shows it")
	}
	ctx := c.Request().Context()
	by := redriver(p)
	var guard func(time.Duration) error
	if a.replayGuard != nil {
		guard = func(age time.Duration) error { return a.replayGuard(ctx, age) }
	}
	e, err := deadletter.Redrive(ctx, a.pool, id, by, guard)
	var refused *deadletter.RefusedError
	switch {
	case errors.Is(err, deadletter.ErrNotFound):
		return &Error{Status: http.StatusNotFound, Code: "not_found", Message: "no such dead letter"}
	case errors.Is(err, deadletter.ErrReplayed):
		return &Error{Status: http.StatusConflict, Code: "already_replayed", Message: "this dead letter was replayed already"}
	case errors.As(err, &refused):
		return &Error{Status: http.StatusConflict, Code: "too_old", Message: refused.Error()}
	case err != nil:
		return err
	}
	if a.committed != nil {
		a.committed()
	}
	a.log.InfoContext(ctx, "dead letter re-driven", "dead_letter_id", e.ID, "order_id", e.OrderID, "participant", e.Participant, "by", by)
	return c.JSON(http.StatusOK, RedriveResponse{DeadLetter: e})
}

// UnparkResponse is the answer to POST /admin/parked/{id}/replay.
type UnparkResponse struct {
	Parked deadletter.Unparked `json:"parked"`
}

// unpark sends a parked outbox record again, as `prozess dlq unpark` does,
// once the cause that parked it is fixed: the row moves back into the
// outbox (see deadletter.Unpark) and the order's trail records who did it.
// Admins only; for any other key the endpoint does not exist (404).
func (a *API) unpark(c echo.Context) error {
	p := principal(c)
	if !p.Admin {
		return errNotFound
	}
	id, err := strconv.ParseInt(c.Param("id"), 10, 64)
	if err != nil || id <= 0 {
		return badRequest("invalid_parked_id", "the parked record's id must be a positive integer, as GET /orders/{id} shows it (parked[].outbox_id)")
	}
	ctx := c.Request().Context()
	by := redriver(p)
	u, err := deadletter.Unpark(ctx, a.pool, id, by)
	switch {
	case errors.Is(err, deadletter.ErrParkedNotFound):
		return &Error{Status: http.StatusNotFound, Code: "not_found", Message: "no such parked record (sent again already, or never parked)"}
	case err != nil:
		return err
	}
	if a.committed != nil {
		a.committed()
	}
	a.log.InfoContext(ctx, "parked record sent again", "parked_id", u.ParkedID, "outbox_id", u.OutboxID, "order_id", u.OrderID, "by", by)
	return c.JSON(http.StatusOK, UnparkResponse{Parked: u})
}

// Bulk re-drive limits: a run re-drives at most maxBulk records (default
// defaultBulk), oldest first; Bulk.More says when more match.
const (
	defaultBulk = 100
	maxBulk     = 1000
)

// BulkRequest is the body of POST /admin/dead-letters/replay and POST
// /admin/parked/replay. DryRun is required, so a caller says which it
// means: a run that changes nothing, or one that re-drives.
type BulkRequest struct {
	Filter deadletter.FilterText `json:"filter"`
	DryRun *bool                 `json:"dry_run"`
	Limit  *int                  `json:"limit,omitempty"`
}

var errAdminOnly = &Error{Status: http.StatusForbidden, Code: "forbidden", Message: "bulk re-drives are for admin keys only"}

// filterNonEmpty are the filter's string fields the document gives a
// format, pattern or enum: given as "" they are refused, not read as
// absent (leaving a field out is how a filter matches any value), as is
// null for any field (encoding/json would read it as absent too).
var filterNonEmpty = []string{"participant", "event_type", "since", "until", "order_id"}

// givenEmpty names the first field of a bulk re-drive's body (decoded
// already) that is null, or "" where filterNonEmpty says it may not be.
func givenEmpty(body []byte) string {
	var given map[string]json.RawMessage
	_ = json.Unmarshal(body, &given)
	var filter map[string]json.RawMessage
	_ = json.Unmarshal(given["filter"], &filter)
	for _, name := range slices.Sorted(maps.Keys(given)) {
		if string(given[name]) == "null" {
			return name
		}
	}
	for _, name := range slices.Sorted(maps.Keys(filter)) {
		if v := string(filter[name]); v == "null" || v == `""` && slices.Contains(filterNonEmpty, name) {
			return "filter." + name
		}
	}
	return ""
}

// decodeBulk reads a bulk re-drive's body strictly and validates it.
func (a *API) decodeBulk(c echo.Context) (deadletter.Filter, int, bool, error) {
	body, err := io.ReadAll(c.Request().Body)
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return deadletter.Filter{}, 0, false, &Error{Status: http.StatusRequestEntityTooLarge, Code: "body_too_large", Message: fmt.Sprintf("request body over %d bytes", tooLarge.Limit)}
	case err != nil:
		return deadletter.Filter{}, 0, false, fmt.Errorf("reading a bulk re-drive's body: %w", err)
	}
	var req BulkRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return deadletter.Filter{}, 0, false, badRequest("invalid_json", "request body is not a valid re-drive: "+jsonProblem(err))
	}
	if dec.More() {
		return deadletter.Filter{}, 0, false, badRequest("invalid_json", "request body has data after the JSON object")
	}
	if field := givenEmpty(body); field != "" {
		return deadletter.Filter{}, 0, false, badRequest("invalid_json", field+" is null or empty; leave it out instead")
	}
	if req.DryRun == nil {
		return deadletter.Filter{}, 0, false, badRequest("dry_run_required", `dry_run is required: true to see what would be re-driven, false to re-drive it`)
	}
	limit := defaultBulk
	if req.Limit != nil {
		if *req.Limit < 1 || *req.Limit > maxBulk {
			return deadletter.Filter{}, 0, false, badRequest("invalid_limit", fmt.Sprintf("limit must be 1 to %d", maxBulk))
		}
		limit = *req.Limit
	}
	f, err := req.Filter.Parse(a.participants)
	var fe *deadletter.FilterError
	switch {
	case errors.As(err, &fe) && fe.Window:
		return deadletter.Filter{}, 0, false, &Error{Status: http.StatusUnprocessableEntity, Code: "invalid_filter", Message: "filter." + fe.Field + ": " + fe.Message}
	case errors.As(err, &fe):
		return deadletter.Filter{}, 0, false, badRequest("invalid_filter", "filter."+fe.Field+": "+fe.Message)
	}
	return f, limit, *req.DryRun, err
}

// redriver names who re-drives, for the dead letters, the trail and the
// audit row: the admin's key.
func redriver(p Principal) string {
	if p.KeyID != "" {
		return "admin key " + p.KeyID
	}
	return "admin"
}

// redriveMatching is POST /admin/dead-letters/replay: the dead letters a
// filter matches, not re-driven yet, re-driven at once (see
// deadletter.RedriveMatching), or with dry_run listed.
func (a *API) redriveMatching(c echo.Context) error {
	return a.bulk(c, "dead letters re-driven", func(ctx context.Context, f deadletter.Filter, limit int, dryRun bool, by string) (deadletter.Bulk, error) {
		var guard func(time.Duration) error
		if a.replayGuard != nil {
			guard = func(age time.Duration) error { return a.replayGuard(ctx, age) }
		}
		res, err := deadletter.RedriveMatching(ctx, a.pool, f, limit, dryRun, by, guard)
		var refused *deadletter.RefusedError
		if errors.As(err, &refused) {
			return res, &Error{Status: http.StatusConflict, Code: "too_old",
				Message: fmt.Sprintf("dead letter %d: %s; narrow the filter (since, ids) to leave it out", refused.ID, refused.Error())}
		}
		return res, err
	})
}

// unparkMatching is POST /admin/parked/replay: the parked records a filter
// matches sent again (see deadletter.UnparkMatching), or with dry_run
// listed.
func (a *API) unparkMatching(c echo.Context) error {
	return a.bulk(c, "parked records sent again", func(ctx context.Context, f deadletter.Filter, limit int, dryRun bool, by string) (deadletter.Bulk, error) {
		return deadletter.UnparkMatching(ctx, a.pool, f, limit, dryRun, by)
	})
}

// bulk serves a bulk re-drive: admins only, 403 for any other key (the
// filter names no record, so there is nothing for a 404 to hide); the
// body decoded and validated before run is called; the relay woken and
// the run logged when it re-drove anything.
func (a *API) bulk(c echo.Context, did string,
	run func(ctx context.Context, f deadletter.Filter, limit int, dryRun bool, by string) (deadletter.Bulk, error)) error {
	p := principal(c)
	if !p.Admin {
		return errAdminOnly
	}
	f, limit, dryRun, err := a.decodeBulk(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	by := redriver(p)
	res, err := run(ctx, f, limit, dryRun, by)
	if err != nil {
		return err
	}
	if !dryRun && res.Count > 0 {
		if a.committed != nil {
			a.committed()
		}
		a.log.InfoContext(ctx, did, "count", res.Count, "redrive_id", res.RedriveID, "by", by)
	}
	return c.JSON(http.StatusOK, res)
}
