package deadletter

import (
	"context"
	"fmt"
	"time"
)

// Replayed returns, of the dead letters ids, those already replayed or
// re-driven, with when: `prozess dlq replay --all` skips them, since a
// replay that failed again is a newer dead letter of its own.
func Replayed(ctx context.Context, db Querier, ids []int64) (map[int64]time.Time, error) {
	out := map[int64]time.Time{}
	if len(ids) == 0 {
		return out, nil
	}
	rows, err := db.Query(ctx, `SELECT id, replayed_at FROM dead_letters WHERE id = ANY($1) AND replayed_at IS NOT NULL`, ids)
	if err != nil {
		return nil, fmt.Errorf("reading which dead letters were replayed: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id int64
		var at time.Time
		if err := rows.Scan(&id, &at); err != nil {
			return nil, fmt.Errorf("reading which dead letters were replayed: %w", err)
		}
		out[id] = at
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading which dead letters were replayed: %w", err)
	}
	return out, nil
}
