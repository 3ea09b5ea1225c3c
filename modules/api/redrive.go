package api

import (
	"errors"
	"net/http"
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
	by := "admin"
	if p.KeyID != "" {
		by = "admin key " + p.KeyID
	}
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
	by := "admin"
	if p.KeyID != "" {
		by = "admin key " + p.KeyID
	}
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
