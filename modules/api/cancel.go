package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"

	"github.com/prozess/prozess/modules/event"
)

// CancelResponse is the answer to POST /orders/{id}/cancel: the order as
// PostgreSQL has it once the cancel is recorded, and when it was asked for
// (absent for an order that ended before anyone asked).
type CancelResponse struct {
	Order
	CancelRequestedAt *time.Time `json:"cancel_requested_at,omitempty"`
}

// ErrShipped refuses a cancel: the order has shipped (or delivery committed
// its shipment first), and a shipped order is not cancelled.
var ErrShipped = &Error{Status: http.StatusConflict, Code: "already_shipped",
	Message: "the order has shipped and can no longer be cancelled"}

// cancelOrder asks for an order to stop: 202 with the order, the same for
// a repeat; 404 for someone else's order (as for reading it); 409 once it
// has shipped.
func (a *API) cancelOrder(c echo.Context) error {
	id, err := orderID(c)
	if err != nil {
		return err
	}
	p := principal(c)
	by := p.UserID
	if p.Admin {
		by = "admin"
		if p.KeyID != "" {
			by = "admin key " + p.KeyID
		}
	}
	ctx := c.Request().Context()
	res, emitted, err := CancelOrder(ctx, a.pool, a.topic, id, by, func(owner string) bool { return canRead(p, owner) })
	if err != nil {
		return err
	}
	if emitted {
		if a.committed != nil {
			a.committed()
		}
		a.log.InfoContext(ctx, "order cancel requested", "order_id", id, "by", by, "status", res.Status)
	}
	return c.JSON(http.StatusAccepted, res)
}

// CancelOrder records a cancel request for an order and emits its
// OrderCancelRequested, in one transaction, at most once per order; it
// reports whether it did. may says whether the caller may cancel an order
// of that owner (false: ErrNotFound, as for reading it). An order that has
// ended (CANCELLED) or was asked already is answered as it stands, with
// nothing emitted; one with a shipment is refused (ErrShipped).
//
// The order's row is held FOR UPDATE while the shipment is looked for:
// delivery holds the paid orders' rows FOR KEY SHARE while it decides, so
// the cancel and the shipment exclude each other whichever commits first
// (see delivery.Handle). Payment and the saga deadline are raced through
// the topic instead: payment decides an unpaid order by whichever of
// InventoryReserved, OrderExpired and OrderCancelRequested it reads first.
func CancelOrder(ctx context.Context, pool *pgxpool.Pool, topic string, id uuid.UUID, by string, may func(owner string) bool) (CancelResponse, bool, error) {
	var at *time.Time
	emitted := false
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var owner string
		var st event.Status
		var shipped bool
		err := tx.QueryRow(ctx, `
			SELECT user_id, status, cancel_requested_at, EXISTS (SELECT 1 FROM shipments s WHERE s.order_id = o.id)
			FROM orders o WHERE id = $1 FOR UPDATE`, id).Scan(&owner, &st, &at, &shipped)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			return errNotFound
		case err != nil:
			return fmt.Errorf("locking order %s: %w", id, err)
		case !may(owner):
			return errNotFound
		case shipped || st == event.StatusShipped:
			// EXISTS above ran before the row lock was granted; after
			// waiting for a delivery that held it, only a new statement
			// sees its shipment.
			return ErrShipped
		case at != nil || st == event.StatusCancelled:
			return nil
		}
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM shipments WHERE order_id = $1)`, id).Scan(&shipped); err != nil {
			return fmt.Errorf("looking for order %s's shipment: %w", id, err)
		}
		if shipped {
			return ErrShipped
		}
		if err := tx.QueryRow(ctx, `
			UPDATE orders SET cancel_requested_at = now(), cancel_requested_by = $2 WHERE id = $1
			RETURNING cancel_requested_at`, id, by).Scan(&at); err != nil {
			return fmt.Errorf("stamping order %s's cancel: %w", id, err)
		}
		ev, err := event.New(event.OrderCancelRequested, id, Name, event.CancelRequested{RequestedBy: by})
		if err != nil {
			return err
		}
		ev.Trace = event.TraceOf(ctx)
		emitted = true
		return event.Emit(ctx, tx, topic, ev)
	})
	if err != nil {
		return CancelResponse{}, false, err
	}
	o, err := ReadOrder(ctx, pool, id)
	if err != nil {
		return CancelResponse{}, false, err
	}
	return CancelResponse{Order: o, CancelRequestedAt: at}, emitted, nil
}
