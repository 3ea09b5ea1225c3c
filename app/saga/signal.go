package saga

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// OutboxSignal is how a process says "outbox rows committed" after a
// commit, never inside one (see migration 00010: a NOTIFY inside the
// transaction serialises every commit on the database). When this
// process's relay leads, it is woken in process; otherwise one NOTIFY
// goes to the leader on a connection of its own, coalesced: commits that
// come while one is being sent share the next.
type OutboxSignal struct {
	relay *Relay
	pool  *pgxpool.Pool
	log   *slog.Logger
	kick  chan struct{}
}

// NewOutboxSignal returns the signal for relay's process; Run sends its
// NOTIFYs.
func NewOutboxSignal(relay *Relay, pool *pgxpool.Pool, log *slog.Logger) *OutboxSignal {
	return &OutboxSignal{relay: relay, pool: pool, log: log, kick: make(chan struct{}, 1)}
}

// Committed says rows were committed to the outbox. It never blocks.
func (s *OutboxSignal) Committed() {
	if s == nil {
		return
	}
	if s.relay.Leading() {
		s.relay.Wake()
		return
	}
	select {
	case s.kick <- struct{}{}:
	default: // one is pending already; it covers this commit too
	}
}

// Run sends the NOTIFYs Committed asked for until ctx ends. A failed one is
// only logged: the leader's poll finds the rows within a second anyway.
func (s *OutboxSignal) Run(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		}
		nctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if _, err := s.pool.Exec(nctx, `SELECT pg_notify('prozess_outbox', '')`); err != nil && ctx.Err() == nil {
			s.log.Debug("outbox notification not sent; the relay's poll will find the rows", "err", err)
		}
		cancel()
	}
}
