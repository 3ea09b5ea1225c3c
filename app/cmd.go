// Package app is prozess's wiring and nothing else: the commands, their
// configuration, and a System that connects the clients, builds the
// participants chosen and runs them as actors of one run group. The machinery
// they run on is in app/saga, what observes them in app/telemetry.
package app

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"

	"github.com/prozess/prozess/app/embedded"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/schema"
	"github.com/prozess/prozess/seed"
)

// Main runs the prozess command line and returns the process exit code.
func Main(args []string) int {
	cmd := NewRootCommand()
	cmd.SetArgs(args)
	if err := cmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "prozess:", err)
		return 1
	}
	return 0
}

// NewRootCommand builds the command tree.
func NewRootCommand() *cobra.Command {
	cfg := DefaultConfig()
	root := &cobra.Command{
		Use:   "prozess",
		Short: "An order-processing saga over one Kafka topic, with exactly-once effects",
		Long: `prozess takes orders over HTTP and drives them through a choreographed saga
(inventory, payment, delivery, status) over one Kafka topic. PostgreSQL is the
source of truth; Redis is a fast path. Every flag has a PROZESS_ environment
variable as fallback, e.g. --database-url and PROZESS_DATABASE_URL.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return envFallback(cmd)
		},
	}
	cfg.logFlags(root.PersistentFlags())
	root.AddCommand(serveCommand(&cfg), devCommand(&cfg), brokerCommand(&cfg), migrateCommand(&cfg), seedCommand(&cfg), loadgenCommand(&cfg), checkCommand(&cfg), dlqCommand(&cfg), apikeyCommand(&cfg), ordersCommand(&cfg))
	root.AddCommand(versionCommand(root))
	return root
}

func serveCommand(cfg *Config) *cobra.Command {
	var fault string
	cmd := &cobra.Command{
		Use:   "serve PARTICIPANT... | all",
		Short: "Run saga participants (api, inventory, payment, delivery, status, or all)",
		Long: `Run the named participants as actors in one process. They talk only through
the Kafka topic, so 'serve all' on a laptop and one 'serve payment' per
container run the same code. 'serve all' runs its own Kafka broker, PostgreSQL
and Redis for whichever of --kafka-brokers, --database-url and --redis-addr is
not given (data in --data-dir); any other mix uses the local ones, those
'prozess dev' serves.`,
		Example: "  prozess serve all\n  prozess serve payment --kafka-brokers 127.0.0.1:9092",
		RunE: func(cmd *cobra.Command, args []string) error {
			names, err := ParseParticipants(args)
			if err != nil {
				return err
			}
			log, err := telemetry.NewLogger(cfg.LogLevel, cfg.LogFormat)
			if err != nil {
				return err
			}
			if fault != "" {
				if cfg.Fault, err = exitAtFault(fault, log); err != nil {
					return err
				}
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			sys, err := NewSystem(ctx, *cfg, names, log)
			if err != nil {
				return err
			}
			return sys.Run(ctx)
		},
	}
	cfg.connectionFlags(cmd.Flags())
	cfg.serveFlags(cmd.Flags())
	cfg.brokerFlags(cmd.Flags(), "broker-addr")
	cfg.embeddedFlags(cmd.Flags())
	cfg.kafkaFlags(cmd.Flags())
	cmd.Flags().StringVar(&fault, "fault", "", "PARTICIPANT:POINT: exit abruptly at that fault point (for crash tests)")
	_ = cmd.Flags().MarkHidden("fault")
	return cmd
}

// exitAtFault makes a fault point end the process at once, like SIGKILL:
// no deferred cleanup, no offset commit.
func exitAtFault(spec string, log *slog.Logger) (saga.FaultFunc, error) {
	who, point, ok := strings.Cut(spec, ":")
	consumerPoint := point == saga.FaultAfterDBCommit || point == saga.FaultBeforeCommit
	relayPoint := point == saga.FaultRelayBeforePublish || point == saga.FaultRelayAfterPublish || point == saga.FaultRelayInSettle
	if !ok || (who == "relay" && !relayPoint) || (who != "relay" && !consumerPoint) {
		return nil, fmt.Errorf("--fault %q: want PARTICIPANT:%s, PARTICIPANT:%s, relay:%s, relay:%s or relay:%s", spec,
			saga.FaultAfterDBCommit, saga.FaultBeforeCommit, saga.FaultRelayBeforePublish, saga.FaultRelayAfterPublish, saga.FaultRelayInSettle)
	}
	return func(participant, p string) error {
		if participant == who && p == point {
			log.Warn("fault injected: exiting", "participant", participant, "point", p)
			os.Exit(86)
		}
		return nil
	}, nil
}

func brokerCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "broker",
		Short: "Run the Kafka-compatible development broker (franz-go's kfake)",
		Long: `Run a Kafka-protocol broker with its data in --data-dir, so participants in
separate processes can share it without Docker and a restart loses nothing.
For development and tests; production uses real Kafka.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := telemetry.NewLogger(cfg.LogLevel, cfg.LogFormat)
			if err != nil {
				return err
			}
			unlock, err := embedded.LockDataDir(cfg.DataDir)
			if err != nil {
				return err
			}
			defer unlock()
			b, err := saga.StartBroker(cfg.BrokerAddr, cfg.kafkaDir(), log)
			if err != nil {
				return err
			}
			fmt.Println(b.ListenAddrs()[0])
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			<-ctx.Done()
			log.Info("broker shutting down")
			b.Close()
			return nil
		},
	}
	cfg.brokerFlags(cmd.Flags(), "addr")
	return cmd
}

func devCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run the servers for participants in separate processes: Kafka broker, PostgreSQL and Redis",
		Long: `Run, in one process, an embedded Kafka broker (franz-go's kfake), a PostgreSQL
server (the machine's installation, or binaries fetched once) and an in-process
Redis, on their usual local ports and with their data in --data-dir, so that
'prozess serve PARTICIPANT' in other terminals finds them with no flags. For
development only; nothing here is meant for production. Ctrl-C stops all three.`,
		Example: "  prozess dev\n  prozess serve payment   # in another terminal",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := telemetry.NewLogger(cfg.LogLevel, cfg.LogFormat)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			unlock, err := embedded.LockDataDir(cfg.DataDir)
			if err != nil {
				return err
			}
			defer unlock()
			pg, err := embedded.StartPostgres(ctx, filepath.Join(cfg.DataDir, "postgres"), cfg.EmbeddedPostgresAddr, "", log)
			if err != nil {
				return err
			}
			defer func() {
				if err := pg.Stop(); err != nil {
					log.Error("embedded PostgreSQL", "err", err)
				}
			}()
			rdb, err := embedded.StartRedis(cfg.EmbeddedRedisAddr, log)
			if err != nil {
				return err
			}
			defer rdb.Close()
			b, err := saga.StartBroker(cfg.BrokerAddr, cfg.kafkaDir(), log)
			if err != nil {
				return err
			}
			defer b.Close()
			fmt.Printf("prozess dev: Kafka %s, PostgreSQL %s, Redis %s (Ctrl-C stops them)\n",
				b.ListenAddrs()[0], pg.URL("prozess"), rdb.Addr())
			<-ctx.Done()
			log.Info("dev servers shutting down")
			return nil
		},
	}
	cfg.brokerFlags(cmd.Flags(), "broker-addr")
	cfg.embeddedFlags(cmd.Flags())
	return cmd
}

func migrateCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Apply the embedded database schema",
		Args:  cobra.NoArgs,
		RunE: cfg.withDB(func(ctx context.Context, log *slog.Logger, pool *pgxpool.Pool) error {
			res, err := schema.Migrate(ctx, pool)
			if err != nil {
				return err
			}
			for _, r := range res {
				log.Info("migration applied", "source", r.Source.Path, "duration", r.Duration)
			}
			if len(res) == 0 {
				log.Info("schema up to date")
			}
			return nil
		}),
	}
	cfg.connectionFlags(cmd.Flags())
	return cmd
}

func seedCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "seed",
		Short: "Load the demo catalogue and the public demo API key (adds what is missing; never changes existing stock)",
		Args:  cobra.NoArgs,
		RunE: cfg.withDB(func(ctx context.Context, log *slog.Logger, pool *pgxpool.Pool) error {
			if _, err := schema.Migrate(ctx, pool); err != nil {
				return err
			}
			n, err := seed.Load(ctx, pool, true)
			if err != nil {
				return err
			}
			log.Info("demo catalogue loaded", "products_added", n)
			return nil
		}),
	}
	cfg.connectionFlags(cmd.Flags())
	return cmd
}

// withDB makes a command body that gets the process's logger and a pool on
// --database-url, closed when the body returns.
func (c *Config) withDB(fn func(ctx context.Context, log *slog.Logger, pool *pgxpool.Pool) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		log, pool, err := c.openDB(cmd.Context())
		if err != nil {
			return err
		}
		defer pool.Close()
		return fn(cmd.Context(), log, pool)
	}
}

// openDB is the process's logger and a pool on --database-url; the caller
// closes the pool.
func (c *Config) openDB(ctx context.Context) (*slog.Logger, *pgxpool.Pool, error) {
	log, err := telemetry.NewLogger(c.LogLevel, c.LogFormat)
	if err != nil {
		return nil, nil, err
	}
	pool, err := OpenDB(ctx, c.databaseURL(), c.StatementTimeout, log)
	if err != nil {
		return nil, nil, err
	}
	return log, pool, nil
}
