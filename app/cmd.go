// Package app is prozess's wiring and nothing else: the commands, their
// configuration, and a System that connects the clients, builds the
// participants chosen and runs them as actors of one run group. The machinery
// they run on is in app/saga, what observes them in app/telemetry.
package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"
	"github.com/twmb/franz-go/pkg/kfake"

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
		return exitCode(err)
	}
	return 0
}

// exitCode is the exit status for a command's error: 1, or the one an
// exitCodeError carries.
func exitCode(err error) int {
	var ec *exitCodeError
	if errors.As(err, &ec) {
		return ec.code
	}
	return 1
}

// exitCodeError is an error with an exit status of its own, for commands
// whose callers (scripts, probes) must tell one failure from another:
// `check` exits 1 for violations and 2 when it could not check.
type exitCodeError struct {
	code int
	err  error
}

func (e *exitCodeError) Error() string { return e.err.Error() }
func (e *exitCodeError) Unwrap() error { return e.err }

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
	cfg.dataDirFlag(root.PersistentFlags())
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
			b, err := cfg.startBroker(log)
			if err != nil {
				return err
			}
			defer b.Close()
			if err := recordServers(cfg.DataDir, embedded.Servers{KafkaBrokers: b.ListenAddrs()}); err != nil {
				return err
			}
			defer embedded.RemoveServers(cfg.DataDir)
			fmt.Fprintln(cmd.OutOrStdout(), b.ListenAddrs()[0])
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			<-ctx.Done()
			log.Info("broker shutting down")
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
Redis, on their usual local ports (a free one where the usual is taken), with
their data and where they listen in --data-dir, so that 'prozess serve
PARTICIPANT' and the other commands in other terminals find them with no flags. For
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
			b, err := cfg.startBroker(log)
			if err != nil {
				return err
			}
			defer b.Close()
			if err := recordServers(cfg.DataDir, embedded.Servers{DatabaseURL: pg.URL("prozess"), RedisAddr: rdb.Addr(), KafkaBrokers: b.ListenAddrs()}); err != nil {
				return err
			}
			defer embedded.RemoveServers(cfg.DataDir)
			fmt.Fprintf(cmd.OutOrStdout(), "prozess dev: Kafka %s, PostgreSQL %s, Redis %s (Ctrl-C stops them; commands here find them in %s)\n",
				b.ListenAddrs()[0], redacted(pg.URL("prozess")), rdb.Addr(), filepath.Join(cfg.DataDir, "servers.json"))
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
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Apply the embedded database schema: the upgrade step (creates the database when missing)",
		Long: `Apply every migration of this build the database lacks, with no time limit
(serve also migrates at start, within its start timeout, unless --migrate=false:
run this first as the upgrade step of a deployment). --dry-run lists what it
would apply and changes nothing; 'migrate status' lists every migration.`,
		Args: cobra.NoArgs,
		RunE: cfg.withSetupDB(func(ctx context.Context, out io.Writer, log *slog.Logger, pool *pgxpool.Pool) error {
			if dryRun {
				ms, err := schema.Status(ctx, pool)
				if err != nil {
					return err
				}
				n := 0
				for _, m := range ms {
					if !m.Applied {
						fmt.Fprintf(out, "would apply %s\n", m.Path)
						n++
					}
				}
				fmt.Fprintf(out, "%d migrations to apply (dry run: nothing changed)\n", n)
				return nil
			}
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
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "list the migrations that would be applied; change nothing")
	cfg.connectionFlags(cmd.Flags())
	status := &cobra.Command{
		Use:   "status",
		Short: "List this build's migrations and which the database has applied (changes nothing)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := telemetry.NewLogger(cfg.LogLevel, cfg.LogFormat)
			if err != nil {
				return err
			}
			url, err := cfg.databaseURL()
			if err != nil {
				return err
			}
			pool, err := openExistingDB(cmd.Context(), url, cfg.StatementTimeout, log)
			if err != nil {
				return err
			}
			defer pool.Close()
			ms, err := schema.Status(cmd.Context(), pool)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			for _, m := range ms {
				state := "pending"
				if m.Applied {
					state = "applied " + m.AppliedAt.UTC().Format(time.RFC3339)
				}
				fmt.Fprintf(out, "%05d  %-40s %s\n", m.Version, m.Path, state)
			}
			return nil
		},
	}
	cfg.connectionFlags(status.Flags())
	cmd.AddCommand(status)
	return cmd
}

func seedCommand(cfg *Config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "seed",
		Short: "Load the demo catalogue and the public demo API key (adds what is missing; never changes existing stock)",
		Args:  cobra.NoArgs,
		RunE: cfg.withSetupDB(func(ctx context.Context, _ io.Writer, log *slog.Logger, pool *pgxpool.Pool) error {
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

// withDB makes a command body that gets the command's output, the
// process's logger and a pool on --database-url, closed when the body
// returns. The database must exist and have this build's schema: only
// withSetupDB's commands create or migrate anything.
func (c *Config) withDB(fn func(ctx context.Context, out io.Writer, log *slog.Logger, pool *pgxpool.Pool) error) func(*cobra.Command, []string) error {
	return c.withDBFor(false, fn)
}

// withSetupDB is withDB for the commands that set a database up (migrate,
// seed): it creates the database when it is missing and asks nothing of
// its schema.
func (c *Config) withSetupDB(fn func(ctx context.Context, out io.Writer, log *slog.Logger, pool *pgxpool.Pool) error) func(*cobra.Command, []string) error {
	return c.withDBFor(true, fn)
}

func (c *Config) withDBFor(setup bool, fn func(ctx context.Context, out io.Writer, log *slog.Logger, pool *pgxpool.Pool) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		log, pool, err := c.openDBFor(cmd.Context(), setup)
		if err != nil {
			return err
		}
		defer pool.Close()
		return fn(cmd.Context(), cmd.OutOrStdout(), log, pool)
	}
}

// openDB is the process's logger and a pool on --database-url (or the
// recorded embedded server's), which must exist with this build's schema;
// the caller closes the pool.
func (c *Config) openDB(ctx context.Context) (*slog.Logger, *pgxpool.Pool, error) {
	return c.openDBFor(ctx, false)
}

func (c *Config) openDBFor(ctx context.Context, setup bool) (*slog.Logger, *pgxpool.Pool, error) {
	log, err := telemetry.NewLogger(c.LogLevel, c.LogFormat)
	if err != nil {
		return nil, nil, err
	}
	url, err := c.databaseURL()
	if err != nil {
		return nil, nil, err
	}
	if setup {
		pool, err := OpenDB(ctx, url, c.StatementTimeout, log)
		return log, pool, err
	}
	pool, err := openExistingDB(ctx, url, c.StatementTimeout, log)
	if err != nil {
		return nil, nil, err
	}
	if err := requireSchema(ctx, pool); err != nil {
		pool.Close()
		return nil, nil, err
	}
	return log, pool, nil
}

// requireSchema refuses a database whose schema is older than this build
// (or absent): reading it would misread it, and migrating is the upgrade
// step's to do (prozess migrate), never a side effect of a look.
func requireSchema(ctx context.Context, pool *pgxpool.Pool) error {
	pending, err := schema.Pending(ctx, pool)
	if err != nil {
		return err
	}
	if pending {
		return fmt.Errorf("the database schema is older than this prozess (or not there): run prozess migrate first")
	}
	return nil
}

// startBroker starts the embedded broker on --broker-addr, or on the usual
// address, or on a free port when that is taken.
func (c Config) startBroker(log *slog.Logger) (*kfake.Cluster, error) {
	ln, err := embedded.Listen(c.BrokerAddr, embedded.UsualKafkaAddr)
	if err != nil {
		return nil, fmt.Errorf("embedded broker cannot listen on %s (a broker already running there?): "+
			"pass --kafka-brokers to use it, or move the embedded one with --broker-addr", c.BrokerAddr)
	}
	if c.BrokerAddr == "" && ln.Addr().String() != embedded.UsualKafkaAddr {
		log.Info("embedded kafka broker: the usual address is taken, using a free port", "usual", embedded.UsualKafkaAddr, "addr", ln.Addr().String())
	}
	return saga.StartBrokerOn(ln, c.kafkaDir(), log)
}

// recordServers records where this process's embedded servers listen in
// its data directory (which it has locked), for the commands given no
// address.
func recordServers(dir string, s embedded.Servers) error {
	s.PID = os.Getpid()
	return embedded.WriteServers(dir, s)
}

// redacted is a URL without its password, for what is printed.
func redacted(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}
