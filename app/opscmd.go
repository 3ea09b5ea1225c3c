package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/api"
)

func checkCommand(cfg *Config) *cobra.Command {
	var deadline time.Duration
	var asJSON, noCache bool
	var sinceFlag string
	var since time.Time
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Verify the saga's invariants against PostgreSQL, the status cache and the dead-letter topic",
		Long: `Check, for a live or quiesced system: orders not terminal after --deadline
(stuck sagas, with their last event); stock conservation per product; effects
at most once; nothing shipped without payment; declined orders' stock given
back exactly once; every audit trail a path through the lifecycle; the Redis
status cache agreeing with PostgreSQL; the outbox draining; and the count of
dead letters. Exits 1 on any violation, 2 when it could not check (a server
unreachable, a bad flag), 0 when every invariant holds. --since bounds the
orders checked to those created in a recent window (a duration such as 24h,
or an RFC 3339 time), so a large database is not read whole; stock
conservation, a sum over every order, is always checked whole.`,
		Args: cobra.NoArgs,
		RunE: cfg.withDB(func(ctx context.Context, out io.Writer, _ *slog.Logger, pool *pgxpool.Pool) error {
			kafka, err := cfg.kafka()
			if err != nil {
				return err
			}
			cc := check.Config{Deadline: deadline, SagaDeadline: cfg.SagaDeadline, Prefix: cfg.RedisPrefix, Kafka: kafka, DLQTopic: cfg.DLQTopic(),
				Since: since}
			if !noCache {
				auth, err := cfg.RedisSecurity.auth()
				if err != nil {
					return err
				}
				addr, err := cfg.redisAddr()
				if err != nil {
					return err
				}
				rdb, err := OpenRedis(addr, auth)
				if err != nil {
					return err
				}
				defer rdb.Close()
				cc.Redis = rdb
			}
			rep, err := check.Run(ctx, pool, cc)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				fmt.Fprint(out, rep.Text())
			}
			if n := len(rep.Violations); n > 0 {
				total := 0
				for _, c := range rep.ViolationsByRule {
					total += c
				}
				return violations(total)
			}
			return nil
		}),
	}
	check := cmd.RunE
	cmd.RunE = func(c *cobra.Command, args []string) error {
		// Read before connecting: a bad value is the user's to fix, whatever
		// state the servers are in.
		var err error
		if since, err = parseSince(sinceFlag, time.Now()); err != nil {
			return &exitCodeError{code: 2, err: err}
		}
		err = check(c, args)
		var v violations
		if err != nil && !errors.As(err, &v) {
			return &exitCodeError{code: 2, err: err}
		}
		return err
	}
	cfg.connectionFlags(cmd.Flags())
	cmd.Flags().DurationVar(&deadline, "deadline", time.Minute, "orders older than this must be terminal (and declined ones released)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.Flags().BoolVar(&noCache, "no-cache", false, "skip the Redis status cache check")
	cmd.Flags().StringVar(&sinceFlag, "since", "", "check only orders created since this long ago (24h) or this time (RFC 3339, 2026-11-30T00:00:00Z); stock conservation stays whole")
	cmd.Flags().DurationVar(&cfg.SagaDeadline, "saga-deadline", cfg.SagaDeadline, "count paid orders older than this that have not shipped, as serve's --saga-deadline")
	return cmd
}

// parseSince reads check's --since: empty for every order, a positive
// duration back from now, or an RFC 3339 time.
func parseSince(v string, now time.Time) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(v); err == nil {
		if d <= 0 {
			return time.Time{}, fmt.Errorf("--since %q: want a positive duration", v)
		}
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return time.Time{}, fmt.Errorf("--since %q: want a duration (24h) or an RFC 3339 time (2026-11-30T00:00:00Z)", v)
	}
	return t, nil
}

// violations is check's finding: the exit status 1 (any other failure of
// check is 2).
type violations int

func (v violations) Error() string { return fmt.Sprintf("%d violations", int(v)) }

func dlqCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dlq",
		Short: "List and replay dead-lettered records and parked outbox records",
	}
	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List the dead-letter topic's records with their reason, participant and origin",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, dls, err := cfg.deadLetters(cmd.Context())
			if err != nil {
				return err
			}
			_, pool, err := cfg.openDB(cmd.Context())
			if err != nil {
				return err
			}
			defer pool.Close()
			parked, err := saga.ReadParked(cmd.Context(), pool)
			out := cmd.OutOrStdout()
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(out).Encode(map[string]any{"dead_letters": dls, "parked": parked})
			}
			fmt.Fprintf(out, "%d dead letters in %s\n", len(dls), cfg.DLQTopic())
			for _, d := range dls {
				fmt.Fprintf(out, "%d@%d  %-10s %-18s from %s at %s\n    key %q: %s\n", d.Partition, d.Offset, d.Participant, d.Type, d.Origin, d.Time, d.Key, d.Reason)
			}
			fmt.Fprintf(out, "%d parked outbox records (refused by the broker for good, kept in PostgreSQL)\n", len(parked))
			for _, p := range parked {
				fmt.Fprintf(out, "outbox #%d  %-18s for %s, %d bytes, parked %s\n    key %q: %s\n", p.ID, p.Type, p.Topic, p.Bytes,
					p.ParkedAt.UTC().Format(time.RFC3339), p.Key, p.Error)
			}
			return nil
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	list.Flags().StringVar(&cfg.DatabaseURL, "database-url", cfg.DatabaseURL, "PostgreSQL connection URL, for parked records (empty: the one recorded in --data-dir)")
	var all bool
	var which []string
	var rf redriveFlags
	replay := &cobra.Command{
		Use:   "replay [--all | --record PARTITION@OFFSET ... | FILTER [--dry-run]]",
		Short: "Put dead-lettered records back on their original topic, once the cause is fixed",
		Long: `Republish dead-lettered records, without their dead-letter headers, to the
topic they came from. Participants that had processed them skip them (their
inbox knows the event id); the others process them now. A record that still
cannot be processed is dead-lettered again, as a new dead letter: --all
skips dead letters already replayed (or re-driven), so each run replays only
what failed since. The topic is read and replayed in batches.

With a filter (--participant, --event-type, --reason, --since, --until,
--order-id, --through-id) or --dry-run, the dead letters recorded in
PostgreSQL that match and were not re-driven yet are re-driven through the
outbox instead, as an admin's POST /admin/dead-letters/replay does: the
relay of a running serve publishes them. --dry-run prints them and changes
nothing; the run itself is recorded (who, when, the filter, the ids) in the
table redrives.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if rf.filtered(cmd) || rf.dryRun {
				if all || len(which) > 0 {
					return fmt.Errorf("--all and --record replay from the topic; a filter (or --dry-run) re-drives from PostgreSQL: give one or the other")
				}
				return cfg.redriveMatching(cmd.Context(), cmd.OutOrStdout(), &rf)
			}
			if all == (len(which) > 0) {
				return fmt.Errorf("give either --all or at least one --record PARTITION@OFFSET")
			}
			chosen := map[string]bool{}
			for _, w := range which {
				p, o, ok := strings.Cut(w, "@")
				if _, err1 := strconv.Atoi(p); !ok || err1 != nil {
					return fmt.Errorf("--record %q: want PARTITION@OFFSET, as dlq list prints", w)
				}
				if _, err2 := strconv.ParseInt(o, 10, 64); err2 != nil {
					return fmt.Errorf("--record %q: want PARTITION@OFFSET, as dlq list prints", w)
				}
				chosen[w] = true
			}
			return cfg.replayDeadLetters(cmd.Context(), cmd.OutOrStdout(), all, chosen)
		},
	}
	replay.Flags().BoolVar(&all, "all", false, "replay every dead letter not replayed yet")
	replay.Flags().StringSliceVar(&which, "record", nil, "a dead letter to replay, PARTITION@OFFSET as dlq list prints it (repeatable)")
	rf.add(replay.Flags(), "dead letters")
	for _, c := range []*cobra.Command{list, replay} {
		cfg.runningKafkaFlags(c.Flags())
	}
	cfg.inboxFlag(replay.Flags())
	replay.Flags().StringVar(&cfg.DatabaseURL, "database-url", cfg.DatabaseURL, "PostgreSQL connection URL, to mark the replayed dead letters in their orders (empty: the one recorded in --data-dir)")
	cmd.AddCommand(list, replay, unparkCommand(cfg))
	return cmd
}

// deadLetters reads the dead-letter topic through the command's Kafka
// connection, which it returns for what else the command does there.
func (c Config) deadLetters(ctx context.Context) (saga.Conn, []saga.DeadLetter, error) {
	kafka, err := c.kafka()
	if err != nil {
		return saga.Conn{}, nil, err
	}
	dls, err := saga.ReadDeadLetters(ctx, kafka, c.DLQTopic())
	return kafka, dls, err
}

func apikeyCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{Use: "apikey", Short: "Create, list and revoke API keys"}
	var user string
	var admin, asJSON bool
	withPool := func(run func(ctx context.Context, out io.Writer, pool *pgxpool.Pool) error) func(*cobra.Command, []string) error {
		return cfg.withDB(func(ctx context.Context, out io.Writer, _ *slog.Logger, pool *pgxpool.Pool) error {
			return run(ctx, out, pool)
		})
	}
	create := &cobra.Command{
		Use:   "create --user USER [--admin]",
		Short: "Create a key for USER; the key is printed once, as the last line",
		Args:  cobra.NoArgs,
		RunE: withPool(func(ctx context.Context, out io.Writer, pool *pgxpool.Pool) error {
			if user == "" {
				return fmt.Errorf("--user is required")
			}
			id, key, err := api.CreateKey(ctx, pool, user, admin)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "created API key %s for user %s (admin: %v); it is shown only now:\n%s\n", id, user, admin, key)
			return nil
		}),
	}
	create.Flags().StringVar(&user, "user", "", "the user the key acts as")
	create.Flags().BoolVar(&admin, "admin", false, "let the key read every order")
	list := &cobra.Command{
		Use:   "list",
		Short: "List keys (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: withPool(func(ctx context.Context, out io.Writer, pool *pgxpool.Pool) error {
			keys, err := api.ListKeys(ctx, pool)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(out).Encode(keys)
			}
			for _, k := range keys {
				state := "active"
				if k.RevokedAt != nil {
					state = "revoked " + k.RevokedAt.Format(time.RFC3339)
				}
				fmt.Fprintf(out, "%-12s user=%-20s admin=%-5v created=%s %s\n", k.ID, k.UserID, k.Admin, k.CreatedAt.Format(time.RFC3339), state)
			}
			return nil
		}),
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	var revokeID string
	revoke := &cobra.Command{
		Use:   "revoke KEY_ID",
		Short: "Revoke a key; it stops working at once",
		Args:  cobra.ExactArgs(1),
		PreRun: func(_ *cobra.Command, args []string) {
			revokeID = args[0]
		},
		RunE: withPool(func(ctx context.Context, out io.Writer, pool *pgxpool.Pool) error {
			if err := api.RevokeKey(ctx, pool, revokeID); err != nil {
				return err
			}
			fmt.Fprintf(out, "revoked %s\n", revokeID)
			return nil
		}),
	}
	for _, c := range []*cobra.Command{create, list, revoke} {
		c.Flags().StringVar(&cfg.DatabaseURL, "database-url", cfg.DatabaseURL, "PostgreSQL connection URL (empty: the one recorded in --data-dir)")
	}
	cmd.AddCommand(create, list, revoke)
	return cmd
}
