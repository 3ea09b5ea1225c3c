package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/prozess/prozess/modules/deadletter"
)

// redriveFlags are the filter of a bulk re-drive on the command line
// (`dlq replay` and `dlq unpark`), the same filter the admin endpoints
// take (deadletter.FilterText), flag for field.
type redriveFlags struct {
	text     deadletter.FilterText
	dryRun   bool
	limit    int
	operator string
}

// filterFlagNames are the flags that choose records; giving any of them
// makes a re-drive a filtered one.
var filterFlagNames = []string{"participant", "event-type", "reason", "since", "until", "order-id", "through-id"}

func (f *redriveFlags) add(fs *pflag.FlagSet, what string) {
	fs.StringVar(&f.text.Participant, "participant", "", what+" of this participant only (for a parked record: the one that emitted it)")
	fs.StringVar(&f.text.EventType, "event-type", "", what+" of this event type (ce_type) only, e.g. PaymentCompleted")
	fs.StringVar(&f.text.Reason, "reason", "", what+" whose reason contains this text (any case), e.g. 23514")
	fs.StringVar(&f.text.Since, "since", "", what+" dead-lettered (parked) at or after this RFC 3339 time")
	fs.StringVar(&f.text.Until, "until", "", what+" dead-lettered (parked) before this RFC 3339 time")
	fs.StringVar(&f.text.OrderID, "order-id", "", what+" of this order only")
	fs.Int64Var(&f.text.ThroughID, "through-id", 0, "leave out ids above this (a dry run prints it: re-drive just what it showed)")
	fs.BoolVar(&f.dryRun, "dry-run", false, "print what would be re-driven (count and list) and change nothing")
	fs.IntVar(&f.limit, "limit", 1000, "re-drive at most this many, oldest first (1 to 10000)")
	fs.StringVar(&f.operator, "operator", defaultOperator(), "who runs this, for the audit record (table redrives), each record and its order's trail")
}

// filtered reports whether any filter flag was given.
func (f *redriveFlags) filtered(cmd *cobra.Command) bool {
	for _, n := range filterFlagNames {
		if cmd.Flags().Changed(n) {
			return true
		}
	}
	return false
}

// filter validates the flags; an error names the flag at fault.
func (f *redriveFlags) filter() (deadletter.Filter, error) {
	if f.limit < 1 || f.limit > 10000 {
		return deadletter.Filter{}, fmt.Errorf("--limit %d: want 1 to 10000", f.limit)
	}
	if strings.TrimSpace(f.operator) == "" {
		return deadletter.Filter{}, fmt.Errorf("--operator: say who runs this")
	}
	flt, err := f.text.Parse(Participants())
	var fe *deadletter.FilterError
	if errors.As(err, &fe) {
		return deadletter.Filter{}, fmt.Errorf("--%s: %s", strings.ReplaceAll(fe.Field, "_", "-"), fe.Message)
	}
	return flt, err
}

// defaultOperator is the person running the command, as the machine knows
// them: user@host.
func defaultOperator() string {
	name := os.Getenv("USER")
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return name + "@" + host
}

// redriveMatching is `dlq replay` with a filter: the dead letters recorded
// in PostgreSQL that it matches, re-driven through the outbox as an
// admin's POST /admin/dead-letters/replay does (deadletter.RedriveMatching:
// already re-driven ones skipped, an audit row naming the operator), or
// listed with --dry-run. The relay of a running `serve` publishes them.
func (c *Config) redriveMatching(ctx context.Context, out io.Writer, f *redriveFlags) error {
	flt, err := f.filter()
	if err != nil {
		return err
	}
	_, retention, err := c.inboxRetention(ctx)
	if err != nil {
		return err
	}
	_, pool, err := c.openDB(ctx)
	if err != nil {
		return err
	}
	defer pool.Close()
	guard := func(age time.Duration) error { return deadletter.TooOld(age, retention, c.Topic) }
	res, err := deadletter.RedriveMatching(ctx, pool, flt, f.limit, f.dryRun, "prozess dlq replay (operator "+f.operator+")", guard)
	var refused *deadletter.RefusedError
	if errors.As(err, &refused) {
		return fmt.Errorf("dead letter #%d is %w; nothing re-driven: narrow the filter (--since) to leave it out", refused.ID, refused.Err)
	}
	if err != nil {
		return err
	}
	for _, d := range res.DeadLetters {
		order := "-"
		if d.OrderID != nil {
			order = d.OrderID.String()
		}
		fmt.Fprintf(out, "dead letter #%d  %-10s %-18s order %s, %s\n    %s\n", d.ID, d.Participant, d.Type, order,
			d.At.UTC().Format(time.RFC3339), d.Reason)
	}
	printBulk(out, res, "dead letters", "re-drove", "dlq replay")
	return nil
}

// printBulk prints a bulk run's outcome: what a dry run would do and how
// to do just that, or what was done and its audit row.
func printBulk(out io.Writer, res deadletter.Bulk, what, did, cmd string) {
	switch {
	case res.Count == 0:
		fmt.Fprintf(out, "nothing matches: no %s to re-drive\n", what)
	case res.DryRun:
		fmt.Fprintf(out, "dry run: %d %s match, %d would be re-driven (ids through %d); nothing changed\n", res.Matched, what, res.Count, res.ThroughID)
		fmt.Fprintf(out, "to re-drive these: prozess %s with the same filter, without --dry-run, and --through-id %d\n", cmd, res.ThroughID)
	default:
		fmt.Fprintf(out, "%s %d %s (re-drive #%d by %s at %s)\n", did, res.Count, what, res.RedriveID, res.By, res.At.UTC().Format(time.RFC3339))
	}
	if res.More {
		fmt.Fprintf(out, "%d more match beyond --limit; run again for them\n", res.Matched-res.Count)
	}
}
