package app

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/prozess/prozess/app/loadgen"
	"github.com/prozess/prozess/app/telemetry"
)

func loadgenCommand(cfg *Config) *cobra.Command {
	lc := loadgen.Config{
		URL: "http://127.0.0.1:8080", Rate: 100, Duration: 20 * time.Second, Warmup: 5 * time.Second,
		MaxInFlight: 512, Deadline: 30 * time.Second, Product: "prod-load", CancelWithin: 500 * time.Millisecond,
	}
	var asJSON, hopsOut, probe bool
	var products, lines int
	var zipf float64
	var seed uint64
	var step, maxRate float64
	cmd := &cobra.Command{
		Use:   "loadgen",
		Short: "Drive the saga with an open-loop load and report latency, throughput and per-order cost",
		Long: `Send orders at a fixed rate whatever the replies (latency counts from when a
request was due, so stalls are not hidden), observe each order's terminal event
on the topic in a consumer group of its own, and report POST and end-to-end
latency percentiles, throughput, errors, dropped and unfinished orders, and
the database's transactions, WAL fsyncs and WAL bytes per order.
With --step, the rate rises by --step until --max-rate or until the system no
longer keeps up, and the knee is reported.`,
		Example: "  prozess loadgen --rate 500 --duration 30s --kafka-brokers 127.0.0.1:9092\n  prozess loadgen --rate 1200 --duration 10s --products 1000 --lines 3\n  prozess loadgen --probe --rate 20 --duration 10s --kafka-brokers 127.0.0.1:19092\n  prozess loadgen --rate 200 --step 200 --max-rate 3000 --duration 10s",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := telemetry.NewLogger(cfg.LogLevel, cfg.LogFormat)
			if err != nil {
				return err
			}
			if lc.Kafka, err = cfg.kafka(); err != nil {
				return err
			}
			ctx := cmd.Context()
			if probe {
				res, err := loadgen.Probe(ctx, loadgen.ProbeConfig{Kafka: lc.Kafka, Rate: lc.Rate, Duration: lc.Duration,
					Partitions: cfg.Partitions, ReplicationFactor: cfg.ReplicationFactor})
				if asJSON {
					enc := json.NewEncoder(cmd.OutOrStdout())
					enc.SetIndent("", "  ")
					if jerr := enc.Encode(res); jerr != nil {
						return jerr
					}
				} else if res.Sent > 0 {
					fmt.Fprint(cmd.OutOrStdout(), loadgen.ProbeTable(lc.Rate, res))
				}
				return err
			}
			if lc.DatabaseURL, err = cfg.databaseURL(); err != nil {
				return err
			}
			lc.Topic = cfg.Topic
			if products > 1 {
				if lc.Catalogue, err = loadgen.NewCatalogue(products, lines, zipf, seed); err != nil {
					return err
				}
				if err := lc.Catalogue.Ensure(ctx, lc.DatabaseURL); err != nil {
					return err
				}
			} else if products < 1 {
				return fmt.Errorf("--products %d: give 1 (every order buys --product, the hot-row worst case) or more (a catalogue)", products)
			} else if err := loadgen.EnsureProduct(ctx, lc.DatabaseURL, lc.Product); err != nil {
				return err
			}
			if lc.APIKey == "" {
				if lc.APIKey, err = loadgen.NewKey(ctx, lc.DatabaseURL); err != nil {
					return err
				}
			}
			var results []loadgen.Result
			knee := 0.0
			for rate := lc.Rate; ; rate += step {
				run := lc
				run.Rate = rate
				r, err := loadgen.New(ctx, run, log)
				if err != nil {
					return err
				}
				res, err := r.Run(ctx)
				r.Close()
				if err != nil {
					return err
				}
				results = append(results, res)
				if !res.KeptUp() {
					break
				}
				knee = rate
				if step <= 0 || rate+step > maxRate {
					break
				}
				run.Warmup = 0 // the system is warm after the first step
				lc.Warmup = 0
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(map[string]any{"runs": results, "knee_rate": knee})
			}
			for _, r := range results {
				for _, e := range r.FirstErrors {
					fmt.Fprintf(cmd.ErrOrStderr(), "error at %.0f/s: %s\n", r.TargetRate, e)
				}
			}
			fmt.Fprint(out, loadgen.Table(results))
			for _, r := range results {
				if c := r.Cancels; c != nil {
					fmt.Fprintf(out, "cancels at %.0f/s: %d sent, %d accepted, %d refused (shipped), %d errors; outcomes %v\n",
						r.TargetRate, c.Sent, c.Accepted, c.Refused, c.Errors, r.Outcomes)
				}
			}
			if hopsOut {
				for _, r := range results {
					fmt.Fprint(out, loadgen.HopTable(r))
				}
			}
			if step > 0 {
				fmt.Fprintf(out, "knee: %.0f orders/s (the highest rate kept up with)\n", knee)
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.BoolVar(&probe, "probe", false, "measure the broker alone instead, with a plain client: records at --rate for --duration to a fresh topic "+
		"(6 partitions, replication factor 3 or the brokers when fewer; deleted afterwards), produced with acks=all and consumed as a participant does; prints produce and produce-to-consume latency, "+
		"the floor under each saga hop of --hops; needs no database")
	fs.BoolVar(&hopsOut, "hops", false, "also print where each shipped order's time went, stretch by stretch (outbox, relay, broker and fetch, handler), from the events' own timestamps")
	cfg.connectionFlags(fs)
	fs.StringVar(&lc.URL, "url", lc.URL, "the api's base URL")
	fs.Float64Var(&lc.Rate, "rate", lc.Rate, "orders per second (the first rate with --step)")
	fs.DurationVar(&lc.Duration, "duration", lc.Duration, "measured duration of each run")
	fs.DurationVar(&lc.Warmup, "warmup", lc.Warmup, "warm-up at the first rate, not measured")
	fs.IntVar(&lc.MaxInFlight, "max-inflight", lc.MaxInFlight, "requests in flight at most; more are dropped, never delayed")
	fs.DurationVar(&lc.Deadline, "deadline", lc.Deadline, "how long orders may take to finish after the last send")
	fs.StringVar(&lc.APIKey, "api-key", "", "API key to send; empty creates one for user loadgen (the server's --rate-limit must allow --rate)")
	fs.StringVar(&lc.Product, "product", lc.Product, "product every order buys (created with ample stock) when --products is 1")
	fs.IntVar(&products, "products", 1, "1: every order buys one unit of --product (one hot stock row, the worst case); more: a catalogue of that many products "+
		"("+loadgen.CataloguePrefix+"0000 ..., created with ample stock) bought with Zipf-skewed popularity")
	fs.IntVar(&lines, "lines", 3, "with --products > 1: each order has 1 to this many distinct lines (uniformly), of 1 or 2 units each")
	fs.Float64Var(&zipf, "zipf", 1.1, "with --products > 1: the popularity exponent s (> 1): the k-th most popular product sells about k^-s as often as the first")
	fs.Uint64Var(&seed, "order-seed", 1, "with --products > 1: seed of the order mix (the same seed and flags send the same orders)")
	fs.Float64Var(&step, "step", 0, "raise the rate by this much per run until the system stops keeping up")
	fs.Float64Var(&maxRate, "max-rate", 5000, "highest rate --step tries")
	fs.Float64Var(&lc.CancelRate, "cancel-rate", 0, "share of accepted orders to cancel (0 to 1), each at a random moment within --cancel-within")
	fs.DurationVar(&lc.CancelWithin, "cancel-within", lc.CancelWithin, "how long after its acceptance an order may be cancelled")
	fs.BoolVar(&asJSON, "json", false, "print JSON instead of a table")
	return cmd
}
