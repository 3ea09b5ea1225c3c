package app

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/prozess/prozess/modules/deadletter"
)

// unparkCommand is `prozess dlq unpark`: parked outbox records (the broker
// refused them for good) sent again once their cause is fixed, as an
// admin's POST /admin/parked/{id}/replay does.
func unparkCommand(cfg *Config) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "unpark [--all | ID ...]",
		Short: "Send parked outbox records again, once the cause is fixed",
		Long: `Move outbox records the relay parked (the broker refused them for good, as
dlq list shows them: "outbox #ID") back into the outbox, each in one
transaction that also records it on its order's audit trail. The relay
publishes them under new outbox ids; a record the broker still refuses is
parked again.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if all == (len(args) > 0) {
				return fmt.Errorf("give either --all or at least one parked record's ID, as dlq list prints it (outbox #ID)")
			}
			var ids []int64
			for _, a := range args {
				id, err := strconv.ParseInt(a, 10, 64)
				if err != nil || id <= 0 {
					return fmt.Errorf("%q: want a parked record's ID, as dlq list prints it (outbox #ID)", a)
				}
				ids = append(ids, id)
			}
			ctx := cmd.Context()
			_, pool, err := cfg.openDB(ctx)
			if err != nil {
				return err
			}
			defer pool.Close()
			if all {
				if ids, err = deadletter.ParkedIDs(ctx, pool); err != nil {
					return err
				}
			}
			out := cmd.OutOrStdout()
			if len(ids) == 0 {
				fmt.Fprintln(out, "nothing parked")
				return nil
			}
			for _, id := range ids {
				u, err := deadletter.Unpark(ctx, pool, id, "prozess dlq unpark")
				if errors.Is(err, deadletter.ErrParkedNotFound) {
					return fmt.Errorf("outbox #%d: no such parked record (sent again already, or never parked)", id)
				}
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "outbox #%d (%s for %s) sent again as outbox #%d\n", u.ParkedID, u.Type, u.Topic, u.OutboxID)
			}
			fmt.Fprintf(out, "unparked %d records\n", len(ids))
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "send every parked record again")
	cmd.Flags().StringVar(&cfg.DatabaseURL, "database-url", cfg.DatabaseURL, "PostgreSQL connection URL (empty: the one recorded in --data-dir)")
	return cmd
}
