package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
)

// ordersCommand is for people at a terminal: one order from the source of
// truth, or the saga's events as they happen.
func ordersCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "orders",
		Short: "Show, cancel or follow orders",
	}
	cmd.AddCommand(ordersGetCommand(cfg), ordersCancelCommand(cfg), ordersTailCommand(cfg))
	return cmd
}

func ordersGetCommand(cfg *Config) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "get ORDER_ID",
		Short:   "Show an order, its items and its audit trail, from PostgreSQL",
		Example: "  prozess orders get 01a2154b-12fe-7269-98f9-3dd93c718619",
		Args:    cobra.ExactArgs(1),
		RunE: cfg.withOrder(func(ctx context.Context, out io.Writer, pool *pgxpool.Pool, id uuid.UUID) error {
			o, err := api.ReadOrder(ctx, pool, id)
			if errors.Is(err, api.ErrNotFound) {
				return fmt.Errorf("order %s: no such order", id)
			}
			if err != nil {
				return err
			}
			evs, err := api.ReadEvents(ctx, pool, id)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(struct {
					api.Order
					Events []api.AuditEvent `json:"events"`
				}{o, evs})
			}
			printOrder(out, o, evs)
			return nil
		}),
	}
	cfg.connectionFlags(cmd.Flags())
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// withOrder is withDB for the commands of one ORDER_ID, which it reads
// first, so a mistyped id is an error before any connection is made.
func (c *Config) withOrder(fn func(ctx context.Context, out io.Writer, pool *pgxpool.Pool, id uuid.UUID) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		id, err := uuid.Parse(args[0])
		if err != nil {
			return fmt.Errorf("ORDER_ID %q is not an order id (a UUID)", args[0])
		}
		return c.withDB(func(ctx context.Context, out io.Writer, _ *slog.Logger, pool *pgxpool.Pool) error {
			return fn(ctx, out, pool, id)
		})(cmd, args)
	}
}

// ordersCancelCommand is `prozess orders cancel`: an operator's cancel,
// the same transaction as an admin's POST /orders/{id}/cancel.
func ordersCancelCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cancel ORDER_ID",
		Short: "Cancel an order, as POST /orders/{id}/cancel does for an admin",
		Long: `Record a cancel for an order and emit its OrderCancelRequested, in one
PostgreSQL transaction; the running saga does the rest: no charge before
payment, a refund after it, the stock given back. A repeat, or an order that
has ended CANCELLED, changes nothing; a shipped order is refused.`,
		Example: "  prozess orders cancel 01a2154b-12fe-7269-98f9-3dd93c718619",
		Args:    cobra.ExactArgs(1),
		RunE: cfg.withOrder(func(ctx context.Context, out io.Writer, pool *pgxpool.Pool, id uuid.UUID) error {
			res, emitted, err := api.CancelOrder(ctx, pool, cfg.Topic, id, "operator (prozess orders cancel)", func(string) bool { return true })
			switch {
			case errors.Is(err, api.ErrNotFound):
				return fmt.Errorf("order %s: no such order", id)
			case errors.Is(err, api.ErrShipped):
				return fmt.Errorf("order %s has shipped: it can no longer be cancelled", id)
			case err != nil:
				return err
			}
			if emitted {
				// Wake the relay now rather than at its next poll.
				if _, err := pool.Exec(ctx, `SELECT pg_notify('prozess_outbox', '')`); err != nil {
					return fmt.Errorf("waking the relay (the cancel is recorded; its poll will send it): %w", err)
				}
				fmt.Fprintf(out, "order %s: cancel requested (it was %s); the saga cancels it: follow it with prozess orders get %s\n", id, res.Status, id)
				return nil
			}
			fmt.Fprintf(out, "order %s: nothing to do, it is %s", id, res.Status)
			if res.CancelRequestedAt != nil {
				fmt.Fprintf(out, " and its cancel was requested at %s", res.CancelRequestedAt.UTC().Format(time.RFC3339))
			}
			fmt.Fprintln(out)
			return nil
		}),
	}
	cfg.connectionFlags(cmd.Flags())
	return cmd
}

func printOrder(w io.Writer, o api.Order, evs []api.AuditEvent) {
	fmt.Fprintf(w, "order   %s\nstatus  %s\nuser    %s\namount  %s\ncreated %s\n", o.OrderID, o.Status, o.UserID,
		money(o.AmountCents), o.CreatedAt.UTC().Format(time.RFC3339Nano))
	fmt.Fprintln(w, "items")
	for _, it := range o.Items {
		fmt.Fprintf(w, "  %-16s x%-4d %s\n", it.ProductID, it.Qty, money(it.PriceCents))
	}
	if len(o.DeadLetters) > 0 {
		fmt.Fprintf(w, "dead letters (%d): records a participant could not process\n", len(o.DeadLetters))
		for _, d := range o.DeadLetters {
			state := "open: re-drive with the live page or prozess dlq replay"
			if d.ReplayedAt != nil {
				state = "re-driven " + d.ReplayedAt.UTC().Format(time.RFC3339) + " by " + d.ReplayedBy
			}
			fmt.Fprintf(w, "  #%-5d %-9s %-18s %s\n         reason: %s\n", d.ID, d.Participant, d.Type, state, d.Reason)
		}
	}
	if len(o.Parked) > 0 {
		fmt.Fprintf(w, "parked (%d): events the broker refused for good\n", len(o.Parked))
		for _, p := range o.Parked {
			fmt.Fprintf(w, "  outbox #%-5d %-9s %-18s reason: %s\n", p.OutboxID, p.Source, p.Type, p.Reason)
		}
	}
	fmt.Fprintf(w, "events (%d)\n", len(evs))
	for i, e := range evs {
		step := ""
		if i > 0 {
			step = "+" + e.Time.Sub(evs[i-1].Time).Round(time.Millisecond).String()
		}
		fmt.Fprintf(w, "  %s %-9s %-18s from %-9s %s\n", e.Time.UTC().Format("15:04:05.000"), step, e.Type, e.Source, e.Data)
	}
}

func money(cents int64) string { return fmt.Sprintf("%d.%02d", cents/100, cents%100) }

// tailLine is one event as `orders tail --json` prints it.
type tailLine struct {
	Time      time.Time    `json:"time"`
	OrderID   string       `json:"order_id"`
	Type      string       `json:"type"`
	Source    string       `json:"source,omitempty"`
	Status    event.Status `json:"status,omitempty"`
	EventID   string       `json:"event_id,omitempty"`
	Partition int32        `json:"partition"`
	Offset    int64        `json:"offset"`
	// Reason is set for a dead letter (with --dead-letters).
	Reason string `json:"dead_letter_reason,omitempty"`
}

func ordersTailCommand(cfg *Config) *cobra.Command {
	var orders, types []string
	var fromStart, asJSON, deadLetters bool
	cmd := &cobra.Command{
		Use:   "tail",
		Short: "Follow the saga's events as they happen (Ctrl-C to stop)",
		Long: `Print every saga event on the topic as it arrives, one line each, optionally
only for some orders or event types. It reads without a consumer group, so it
changes nothing. --from-start replays the topic's retained history first.`,
		Example: "  prozess orders tail --kafka-brokers 127.0.0.1:9092\n" +
			"  prozess orders tail --kafka-brokers 127.0.0.1:9092 --type PaymentFailed --type InventoryFailed\n" +
			"  prozess orders tail --kafka-brokers 127.0.0.1:9092 --order 01a2154b-12fe-7269-98f9-3dd93c718619 --from-start",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			wantOrder := map[string]bool{}
			for _, o := range orders {
				id, err := uuid.Parse(o)
				if err != nil {
					return fmt.Errorf("--order %q is not an order id (a UUID)", o)
				}
				wantOrder[id.String()] = true
			}
			for _, t := range types {
				if !event.Type(t).Known() {
					return fmt.Errorf("--type %q: want one of %v", t, event.Types)
				}
			}
			topics := []string{cfg.Topic}
			if deadLetters {
				topics = append(topics, cfg.DLQTopic())
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			out := cmd.OutOrStdout()
			enc := json.NewEncoder(out)
			kafka, err := cfg.kafka()
			if err != nil {
				return err
			}
			return saga.Tail(ctx, kafka, topics, fromStart, func(r *kgo.Record) {
				l, ok := toTailLine(r, cfg.DLQTopic())
				if !ok || len(wantOrder) > 0 && !wantOrder[l.OrderID] || len(types) > 0 && !slices.Contains(types, l.Type) {
					return
				}
				if asJSON {
					_ = enc.Encode(l)
					return
				}
				if l.Reason != "" {
					fmt.Fprintf(out, "%s  %s  DEAD LETTER %s: %s\n", l.Time.Format("15:04:05.000"), l.OrderID, l.Type, l.Reason)
					return
				}
				fmt.Fprintf(out, "%s  %s  %-18s %-9s -> %s\n", l.Time.Format("15:04:05.000"), l.OrderID, l.Type, l.Source, l.Status)
			})
		},
	}
	cfg.runningKafkaFlags(cmd.Flags())
	cmd.Flags().StringSliceVar(&orders, "order", nil, "only this order's events (repeatable)")
	cmd.Flags().StringSliceVar(&types, "type", nil, "only events of this type, e.g. PaymentFailed (repeatable)")
	cmd.Flags().BoolVar(&fromStart, "from-start", false, "start at the oldest retained event instead of now")
	cmd.Flags().BoolVar(&deadLetters, "dead-letters", false, "also print records dead-lettered from now on")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per line")
	return cmd
}

// toTailLine describes a saga event or a dead letter; records that are
// neither (undecodable ones not yet dead-lettered) are not printed.
func toTailLine(r *kgo.Record, dlq string) (tailLine, bool) {
	if r.Topic == dlq {
		d := saga.ParseDeadLetter(r)
		return tailLine{Time: d.At(), OrderID: d.Key, Type: d.Type, Partition: r.Partition, Offset: r.Offset,
			Reason: strings.TrimSpace(d.Participant + ": " + d.Reason)}, true
	}
	ev, err := event.FromRecord(r)
	if err != nil {
		return tailLine{}, false
	}
	return tailLine{Time: ev.Time, OrderID: ev.OrderID.String(), Type: string(ev.Type), Source: ev.Source, Status: ev.Type.OrderStatus(),
		EventID: ev.ID.String(), Partition: r.Partition, Offset: r.Offset}, true
}
