package saga

import (
	"context"
	"errors"
	"io"
	"net"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prozess/prozess/modules/event"
)

// failure is what an error says about retrying the records that met it.
type failure int

const (
	// transient: the world, not the record (a server down, a timeout, a
	// serialization failure). Retry, with backoff, forever.
	transient failure = iota
	// permanent: the record's fault (undecodable, invalid, a data or
	// integrity error its effect raises). Dead-letter it, alone.
	permanent
	// unknown: neither. Retried, but a record that keeps failing with it
	// on its own past --poison-after is dead-lettered with the error.
	unknown
)

// classify sorts an error from applying a batch.
func classify(err error) failure {
	if errors.Is(err, event.ErrInvalid) {
		return permanent
	}
	var pg *pgconn.PgError
	if errors.As(err, &pg) && len(pg.Code) == 5 {
		if pg.Code == "25006" {
			// read_only_sql_transaction: the server is a standby (a
			// failover not finished, or a URL without
			// target_session_attrs=read-write reaching one) or was made
			// read-only: the world's state, which passes. Left unknown, a
			// record retried alone past --poison-after would be
			// dead-lettered for it.
			return transient
		}
		switch pg.Code[:2] {
		case "22", "23": // data exception, integrity constraint violation
			return permanent
		case "08", "40", "53", "55", "57", "58": // connection, serialization and deadlock, resources, lock, timeouts and shutdown, system
			return transient
		}
		return unknown
	}
	var netErr net.Error
	var connErr *pgconn.ConnectError
	switch {
	case errors.As(err, &connErr), errors.As(err, &netErr), pgconn.Timeout(err), pgconn.SafeToRetry(err),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return transient
	}
	return unknown
}
