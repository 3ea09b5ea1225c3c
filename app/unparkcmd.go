package app

import (
	"fmt"
	"slices"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/prozess/prozess/modules/deadletter"
)

// unparkCommand is `prozess dlq unpark`: parked outbox records (the broker
// refused them for good) sent again once their cause is fixed, by id, all
// of them, or those a filter matches, as an admin's POST
// /admin/parked/{id}/replay and POST /admin/parked/replay do. Every run
// goes through deadletter.UnparkMatching: one transaction, an audit row.
func unparkCommand(cfg *Config) *cobra.Command {
	var all bool
	var rf redriveFlags
	cmd := &cobra.Command{
		Use:   "unpark [--all | ID ... | FILTER] [--dry-run]",
		Short: "Send parked outbox records again, once the cause is fixed",
		Long: `Move outbox records the relay parked (the broker refused them for good, as
dlq list shows them: "outbox #ID") back into the outbox, in one transaction
that also records each on its order's audit trail and the run (who, when,
which) in the table redrives. The relay publishes them under new outbox ids;
a record the broker still refuses is parked again. Choose them by ID, with
--all, or with a filter (--participant: the participant that emitted the
record, --event-type, --reason: text of the broker's error, --since,
--until, --order-id); --dry-run prints what would be sent and changes
nothing.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			filtered := rf.filtered(cmd)
			if n := btoi(all) + btoi(len(args) > 0) + btoi(filtered); n != 1 && !(n == 0 && rf.dryRun) {
				return fmt.Errorf("give one of --all, a filter (--participant, --event-type, --reason, --since, --until, --order-id) or parked records' IDs, as dlq list prints them (outbox #ID)")
			}
			flt, err := rf.filter()
			if err != nil {
				return err
			}
			for _, a := range args {
				id, err := strconv.ParseInt(a, 10, 64)
				if err != nil || id <= 0 {
					return fmt.Errorf("%q: want a parked record's ID, as dlq list prints it (outbox #ID)", a)
				}
				flt.IDs = append(flt.IDs, id)
			}
			if len(flt.IDs) > deadletter.MaxIDs {
				return fmt.Errorf("%d IDs: at most %d at a time", len(flt.IDs), deadletter.MaxIDs)
			}
			ctx := cmd.Context()
			_, pool, err := cfg.openDB(ctx)
			if err != nil {
				return err
			}
			defer pool.Close()
			by := "prozess dlq unpark (operator " + rf.operator + ")"
			if len(flt.IDs) > 0 {
				// Named one by one, each must be there: a dry run first.
				found, err := deadletter.UnparkMatching(ctx, pool, flt, rf.limit, true, by)
				if err != nil {
					return err
				}
				for _, id := range flt.IDs {
					if !slices.ContainsFunc(found.Parked, func(u deadletter.Unparked) bool { return u.ParkedID == id }) {
						return fmt.Errorf("outbox #%d: no such parked record (sent again already, or never parked); nothing sent", id)
					}
				}
			}
			res, err := deadletter.UnparkMatching(ctx, pool, flt, rf.limit, rf.dryRun, by)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if res.Count == 0 && !filtered {
				fmt.Fprintln(out, "nothing parked")
				return nil
			}
			for _, u := range res.Parked {
				if rf.dryRun {
					fmt.Fprintf(out, "outbox #%d (%s for %s) would be sent again; parked %s: %s\n", u.ParkedID, u.Type, u.Topic,
						u.ParkedAt.UTC().Format("2006-01-02T15:04:05Z"), u.Reason)
				} else {
					fmt.Fprintf(out, "outbox #%d (%s for %s) sent again as outbox #%d\n", u.ParkedID, u.Type, u.Topic, u.OutboxID)
				}
			}
			if !rf.dryRun {
				fmt.Fprintf(out, "unparked %d records\n", res.Count)
			}
			printBulk(out, res, "parked records", "sent again", "dlq unpark")
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "send every parked record again")
	rf.add(cmd.Flags(), "parked records")
	cmd.Flags().StringVar(&cfg.DatabaseURL, "database-url", cfg.DatabaseURL, "PostgreSQL connection URL (empty: the one recorded in --data-dir)")
	return cmd
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
