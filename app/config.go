package app

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prozess/prozess/app/embedded"
	"github.com/prozess/prozess/app/saga"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.opentelemetry.io/otel/trace"
)

// Config is everything a prozess process is told at start. Flags are
// canonical; each has a PROZESS_ environment variable as fallback.
type Config struct {
	DatabaseURL        string
	RedisAddr          string
	RedisPrefix        string
	KafkaBrokers       []string
	KafkaSecurity      KafkaSecurity // TLS and SASL for every Kafka client
	RedisSecurity      RedisSecurity // ACL user, password and TLS for Redis
	Topic              string
	Partitions         int32
	HTTPAddr           string
	PaymentDeclineRate float64
	BrokerAddr         string // embedded broker, when KafkaBrokers is empty
	DataDir            string // embedded servers' data: kafka/ and postgres/ in it
	// EmbeddedPostgresAddr and EmbeddedRedisAddr are where `serve all` and
	// `dev` serve their own PostgreSQL and Redis when no DatabaseURL or
	// RedisAddr is given.
	EmbeddedPostgresAddr string
	EmbeddedRedisAddr    string
	Seed                 bool
	Migrate              bool // apply pending migrations at serve start; false: refuse an older schema
	Embedded             bool // serve all runs the servers not given even when others are given (development)
	ShutdownTimeout      time.Duration
	DrainDelay           time.Duration // at shutdown, /readyz fails this long before the HTTP server stops taking requests
	LogLevel             string
	LogFormat            string
	PprofAddr            string        // serves net/http/pprof when set
	AdminAddr            string        // serves /metrics, /livez, /readyz when set
	NoAuth               bool          // authentication off, for local use only
	RateLimit            float64       // requests per second per API key
	RateBurst            int           // requests a key may burst above RateLimit
	HTTPReadTimeout      time.Duration // a request's headers and body must arrive within this
	KeyCacheTTL          time.Duration // how long the api may cache a valid API key (0: never)
	AuthFailRate         float64       // failed authentications per second per client address before 429
	AuthFailBurst        int           // failed authentications an address may burst above AuthFailRate
	TrustedProxies       []*net.IPNet  // peers whose X-Forwarded-For names the client address
	Demo                 bool          // this is a demo: the public demo key may work beyond loopback
	StatementTimeout     time.Duration // PostgreSQL statement_timeout for every connection
	KafkaLogLevel        string        // the Kafka client's own log level; empty for none
	GroupPrefix          string        // consumer groups are <prefix><participant>
	ReplicationFactor    int16         // of the topics prozess creates; 0: 3, or the brokers when fewer
	MinInSync            int           // their min.insync.replicas; 0: replication factor - 1, at least 1
	DLQRetention         time.Duration // how long dead letters are kept; 0: until removed
	StrictTopics         bool          // refuse existing topics less durable than configured
	InstanceID           string        // static group membership (group.instance.id) when set
	ResetOutOfRange      bool          // skip to the log start when a committed offset was deleted
	InboxMargin          time.Duration // inbox rows outlive the topic's retention by this much
	PoisonAfter          time.Duration // a record failing alone with an unclassified error is dead-lettered after this
	GiveUpAfter          time.Duration // a consumer whose PostgreSQL does not answer this long leaves its group
	SessionTimeout       time.Duration // the consumer group session: a member silent this long loses its partitions
	SagaDeadline         time.Duration // an order not past payment by then is expired (cancelled, stock given back)

	// Fault, when set, is called at the consumers' fault points (tests).
	Fault saga.FaultFunc
	// KafkaDial, when set, opens every connection the System's Kafka
	// clients make to a broker (saga.Conn.Dial): tests route one instance
	// through a fault proxy while the others reach the broker directly.
	KafkaDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// TracerProvider, when set, traces with it instead of what the OTEL_
	// environment variables say (tests export to memory).
	TracerProvider trace.TracerProvider
}

// AdminAuto is the --admin-addr default: a port of the process's own, so
// participants in separate processes on one machine never collide.
const AdminAuto = "auto"

// DefaultConfig returns the defaults, which work on a fresh machine: with no
// database URL or Redis address, `serve all` runs its own PostgreSQL and
// Redis, and every other command talks to the servers a running `serve all`
// or `dev` recorded in the data directory.
func DefaultConfig() Config {
	return Config{
		RedisPrefix:        "prozess:",
		GroupPrefix:        "prozess-",
		InboxMargin:        time.Hour,
		PoisonAfter:        time.Minute,
		GiveUpAfter:        10 * time.Second,
		SessionTimeout:     10 * time.Second,
		SagaDeadline:       15 * time.Minute,
		Topic:              "order-events",
		Partitions:         6,
		HTTPAddr:           "127.0.0.1:8080",
		AdminAddr:          AdminAuto,
		PaymentDeclineRate: 0.15,
		DataDir:            ".prozess",
		Seed:               true,
		Migrate:            true,
		ShutdownTimeout:    15 * time.Second,
		RateLimit:          50,
		RateBurst:          100,
		HTTPReadTimeout:    10 * time.Second,
		KeyCacheTTL:        10 * time.Second,
		AuthFailRate:       5,
		AuthFailBurst:      20,
		StatementTimeout:   30 * time.Second,
		LogLevel:           "info",
		LogFormat:          "text",
	}
}

// DLQTopic is where records that can never be processed go.
func (c Config) DLQTopic() string { return c.Topic + ".dlq" }

func (c *Config) connectionFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.DatabaseURL, "database-url", c.DatabaseURL,
		"PostgreSQL connection URL (the database is created if missing); empty: serve all runs its own, other commands use the one a running serve all or dev recorded in --data-dir")
	fs.DurationVar(&c.StatementTimeout, "db-statement-timeout", c.StatementTimeout, "PostgreSQL statement_timeout for every query (0: none)")
	fs.StringVar(&c.RedisAddr, "redis-addr", c.RedisAddr, "Redis address, host:port; empty: serve all runs its own, other commands use the one a running serve all or dev recorded in --data-dir")
	fs.StringVar(&c.RedisPrefix, "redis-prefix", c.RedisPrefix, "prefix of every Redis key, so deployments can share one Redis")
	fs.StringSliceVar(&c.KafkaBrokers, "kafka-brokers", c.KafkaBrokers, "Kafka bootstrap brokers, comma-separated; empty: serve all runs its own, other commands use the one a running serve all, dev or broker recorded in --data-dir")
	fs.StringVar(&c.Topic, "topic", c.Topic, "the saga's topic (dead letters go to <topic>.dlq)")
	c.KafkaSecurity.flags(fs)
	c.RedisSecurity.flags(fs)
}

// kafka is how this command's clients reach the brokers it names, or those
// recorded by the serve all, dev or broker running on --data-dir.
func (c Config) kafka() (saga.Conn, error) {
	brokers, err := c.brokers()
	if err != nil {
		return saga.Conn{}, err
	}
	return c.KafkaSecurity.conn(brokers)
}

// runningKafkaFlags are for commands that talk to the brokers of a running
// system (dlq, orders tail): they start no broker of their own.
func (c *Config) runningKafkaFlags(fs *pflag.FlagSet) {
	fs.StringSliceVar(&c.KafkaBrokers, "kafka-brokers", c.KafkaBrokers,
		"Kafka bootstrap brokers, comma-separated; empty: those a running serve all, dev or broker recorded in --data-dir")
	fs.StringVar(&c.Topic, "topic", c.Topic, "the saga's topic (dead letters are in <topic>.dlq)")
	c.KafkaSecurity.flags(fs)
}

// local is what the serve all, dev or broker running on --data-dir
// recorded; flag names the address the caller lacks, for the error.
func (c Config) local(flag string) (embedded.Servers, error) {
	s, err := embedded.ReadServers(c.DataDir)
	if err != nil {
		return s, fmt.Errorf("--%s not given, and %w: start `prozess serve all` or `prozess dev` there, or pass --%s (or %s)",
			flag, err, flag, EnvName(flag))
	}
	return s, nil
}

// databaseURL is --database-url, or the recorded embedded server's.
func (c Config) databaseURL() (string, error) {
	if c.DatabaseURL != "" {
		return c.DatabaseURL, nil
	}
	s, err := c.local("database-url")
	if err == nil && s.DatabaseURL == "" {
		err = fmt.Errorf("--database-url not given, and the prozess running with --data-dir %s serves no PostgreSQL of its own: pass --database-url", c.DataDir)
	}
	return s.DatabaseURL, err
}

// redisAddr is --redis-addr, or the recorded embedded server's.
func (c Config) redisAddr() (string, error) {
	if c.RedisAddr != "" {
		return c.RedisAddr, nil
	}
	s, err := c.local("redis-addr")
	if err == nil && s.RedisAddr == "" {
		err = fmt.Errorf("--redis-addr not given, and the prozess running with --data-dir %s serves no Redis of its own: pass --redis-addr", c.DataDir)
	}
	return s.RedisAddr, err
}

// brokers is --kafka-brokers, or the recorded embedded broker's.
func (c Config) brokers() ([]string, error) {
	if len(c.KafkaBrokers) > 0 {
		return c.KafkaBrokers, nil
	}
	s, err := c.local("kafka-brokers")
	if err == nil && len(s.KafkaBrokers) == 0 {
		err = fmt.Errorf("--kafka-brokers not given, and the prozess running with --data-dir %s serves no broker of its own: pass --kafka-brokers", c.DataDir)
	}
	return s.KafkaBrokers, err
}

func (c *Config) logFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "log level: debug, info, warn, error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "log format: text or json")
}

func (c *Config) brokerFlags(fs *pflag.FlagSet, addrName string) {
	fs.StringVar(&c.BrokerAddr, addrName, c.BrokerAddr, "listen address of the embedded Kafka broker (default "+embedded.UsualKafkaAddr+", or a free port when that is taken)")
}

// dataDirFlag is every command's: where serve all, dev and broker keep
// their data and record where their servers listen, which the other
// commands read when given no address.
func (c *Config) dataDirFlag(fs *pflag.FlagSet) {
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir,
		"directory of the embedded servers' data (kafka/, postgres/) and of where they listen (servers.json), which commands given no address use")
}

// embeddedFlags are the addresses of the PostgreSQL and Redis that serve
// all and dev run themselves.
func (c *Config) embeddedFlags(fs *pflag.FlagSet) {
	fs.BoolVar(&c.Embedded, "embedded", c.Embedded,
		"serve all: run here whichever of PostgreSQL, Redis and Kafka has no address given, even when others have (development only); without it that happens only when none is given")
	fs.StringVar(&c.EmbeddedPostgresAddr, "embedded-postgres-addr", c.EmbeddedPostgresAddr,
		"listen address of the embedded PostgreSQL, without --database-url (default "+embedded.UsualPostgresAddr+", or a free port when that is taken)")
	fs.StringVar(&c.EmbeddedRedisAddr, "embedded-redis-addr", c.EmbeddedRedisAddr,
		"listen address of the embedded Redis, without --redis-addr (default "+embedded.UsualRedisAddr+", or a free port when that is taken)")
}

// kafkaDir is where the embedded broker keeps its data.
func (c Config) kafkaDir() string { return filepath.Join(c.DataDir, "kafka") }

// kafkaFlags are how serve uses Kafka: its topics' durability and its
// consumer groups.
func (c *Config) kafkaFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.GroupPrefix, "group-prefix", c.GroupPrefix, "consumer groups are <prefix><participant>, so deployments can share a cluster")
	fs.Int16Var(&c.ReplicationFactor, "replication-factor", c.ReplicationFactor, "replication factor of the topics prozess creates (0: 3, or the number of brokers when fewer)")
	fs.IntVar(&c.MinInSync, "min-insync-replicas", c.MinInSync, "min.insync.replicas of the topics prozess creates (0: replication factor - 1, at least 1)")
	fs.DurationVar(&c.DLQRetention, "dlq-retention", c.DLQRetention, "how long the dead-letter topic keeps records (0: until an operator removes them)")
	fs.BoolVar(&c.StrictTopics, "strict-topics", c.StrictTopics, "refuse to start when an existing topic is less durable than configured (default: warn)")
	fs.StringVar(&c.InstanceID, "instance-id", c.InstanceID,
		"static consumer group membership (group.instance.id), unique per process: a restart within the session timeout keeps its partitions")
	c.inboxFlag(fs)
	fs.DurationVar(&c.PoisonAfter, "poison-after", c.PoisonAfter,
		"dead-letter a record that, alone, keeps failing this long with an error that is neither transient nor its own fault")
	fs.DurationVar(&c.SessionTimeout, "session-timeout", c.SessionTimeout,
		"consumer group session timeout: a member silent this long loses its partitions to the others; with --instance-id, longer than a restart takes (e.g. 60s), so a restart keeps them")
	fs.DurationVar(&c.GiveUpAfter, "give-up-after", c.GiveUpAfter,
		"leave the consumer group (so another instance takes the partitions over) when PostgreSQL has not answered this long; rejoin when it does")
	fs.DurationVar(&c.SagaDeadline, "saga-deadline", c.SagaDeadline,
		"cancel an order short of payment that a participant has held this long (counted from when inventory or payment received its event, never while the backlog holds it; its stock comes back); a paid order is never cancelled, only reported")
	fs.BoolVar(&c.ResetOutOfRange, "reset-out-of-range", c.ResetOutOfRange,
		"when a committed offset was deleted by retention, go on from the oldest record instead of stopping (skips what was deleted)")
}

func (c *Config) inboxFlag(fs *pflag.FlagSet) {
	fs.DurationVar(&c.InboxMargin, "inbox-retention-margin", c.InboxMargin,
		"inbox rows are kept for the saga topic's retention.ms plus this (forever when the topic keeps records forever)")
}

func (c *Config) serveFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.HTTPAddr, "http-addr", c.HTTPAddr, "listen address of the HTTP API (api participant)")
	fs.Float64Var(&c.PaymentDeclineRate, "payment-decline-rate", c.PaymentDeclineRate, "share of simulated payments declined, 0 to 1")
	fs.Int32Var(&c.Partitions, "partitions", c.Partitions, "partitions of the saga topic when it is created")
	fs.BoolVar(&c.Migrate, "migrate", c.Migrate,
		"apply pending migrations at start, within the 30 s start timeout; false (production): refuse to start on an older schema, and run prozess migrate as the upgrade step")
	fs.BoolVar(&c.Seed, "seed", c.Seed, "load the demo catalogue and the demo API key at start (adds what is missing only; use false in production)")
	fs.BoolVar(&c.NoAuth, "no-auth", c.NoAuth, "turn API key authentication off: anyone may act as any user (local use only)")
	fs.Float64Var(&c.RateLimit, "rate-limit", c.RateLimit, "requests per second allowed per API key (0: unlimited)")
	fs.IntVar(&c.RateBurst, "rate-burst", c.RateBurst, "requests an API key may burst above --rate-limit")
	fs.DurationVar(&c.HTTPReadTimeout, "http-read-timeout", c.HTTPReadTimeout, "time a client has to send a request's headers and body")
	fs.Float64Var(&c.AuthFailRate, "auth-fail-rate", c.AuthFailRate,
		"failed authentications per second a client address may make before it gets 429 (bounds key lookups per address; 0: no bound)")
	fs.IntVar(&c.AuthFailBurst, "auth-fail-burst", c.AuthFailBurst, "failed authentications a client address may burst above --auth-fail-rate")
	fs.Var(cidrs{&c.TrustedProxies}, "trusted-proxies",
		"CIDRs of the proxies in front of the api (e.g. 10.0.0.0/8): a request from one of them is counted by the client address its X-Forwarded-For names; empty: the TCP peer, whatever the headers say")
	fs.BoolVar(&c.Demo, "demo", c.Demo,
		"this is a demo: create and accept the public demo API key even when --http-addr listens beyond loopback (never in production)")
	fs.DurationVar(&c.KeyCacheTTL, "key-cache-ttl", c.KeyCacheTTL,
		"how long the api may keep a valid API key in memory (revocations reach it at once); 0 looks every request's key up")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", c.ShutdownTimeout, "how long in-flight work may take to finish at shutdown")
	fs.DurationVar(&c.DrainDelay, "drain-delay", c.DrainDelay,
		"at SIGTERM, answer /readyz with 503 and keep serving requests this long before the HTTP server stops, so a load balancer stops sending first (behind one: a few probe periods, e.g. 5s)")
	fs.StringVar(&c.AdminAddr, "admin-addr", c.AdminAddr, "listen address of /metrics, /livez and /readyz; "+
		"auto: 127.0.0.1:9464 for all and api, :9465 inventory, :9466 payment, :9467 delivery, :9468 status (the first named; loopback only, metrics are private); empty: off")
	fs.StringVar(&c.KafkaLogLevel, "kafka-log-level", c.KafkaLogLevel, "log the Kafka client's own messages at this level (error, warn, info, debug); off when empty")
	fs.StringVar(&c.PprofAddr, "pprof-addr", c.PprofAddr, "serve Go's pprof profiles on this address (e.g. 127.0.0.1:6060); off when empty")
}

func (c Config) validate() error {
	if c.PaymentDeclineRate < 0 || c.PaymentDeclineRate > 1 || c.PaymentDeclineRate != c.PaymentDeclineRate {
		return fmt.Errorf("--payment-decline-rate %v: must be between 0 and 1", c.PaymentDeclineRate)
	}
	if c.Partitions < 1 || c.Partitions > 1000 {
		return fmt.Errorf("--partitions %d: must be between 1 and 1000", c.Partitions)
	}
	if c.Topic == "" || strings.ContainsAny(c.Topic, " /\\") || len(c.Topic) > 200 {
		return fmt.Errorf("--topic %q: must be a valid Kafka topic name", c.Topic)
	}
	if c.ReplicationFactor < 0 {
		return fmt.Errorf("--replication-factor %d: must not be negative", c.ReplicationFactor)
	}
	if c.MinInSync < 0 {
		return fmt.Errorf("--min-insync-replicas %d: must not be negative", c.MinInSync)
	}
	if c.DLQRetention < 0 {
		return fmt.Errorf("--dlq-retention %s: must not be negative", c.DLQRetention)
	}
	if c.PoisonAfter <= 0 {
		return fmt.Errorf("--poison-after %s: must be positive", c.PoisonAfter)
	}
	if c.SessionTimeout < 6*time.Second || c.SessionTimeout > 30*time.Minute {
		return fmt.Errorf("--session-timeout %s: must be from 6s to 30m (the brokers' default group.min/max.session.timeout.ms)", c.SessionTimeout)
	}
	if c.GiveUpAfter <= 0 {
		return fmt.Errorf("--give-up-after %s: must be positive", c.GiveUpAfter)
	}
	if c.SagaDeadline <= 0 {
		return fmt.Errorf("--saga-deadline %s: must be positive", c.SagaDeadline)
	}
	if c.GroupPrefix == "" {
		return fmt.Errorf("--group-prefix: must not be empty")
	}
	if c.AuthFailRate < 0 || c.AuthFailBurst < 0 {
		return fmt.Errorf("--auth-fail-rate %v, --auth-fail-burst %d: must not be negative", c.AuthFailRate, c.AuthFailBurst)
	}
	if c.DrainDelay < 0 {
		return fmt.Errorf("--drain-delay %s: must not be negative", c.DrainDelay)
	}
	if c.KeyCacheTTL < 0 {
		return fmt.Errorf("--key-cache-ttl %s: must not be negative", c.KeyCacheTTL)
	}
	return nil
}

// envFallback sets every flag the user did not give from its PROZESS_
// variable (--kafka-brokers from PROZESS_KAFKA_BROKERS).
func envFallback(cmd *cobra.Command) error {
	var err error
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed {
			return
		}
		name := EnvName(f.Name)
		v, ok := os.LookupEnv(name)
		if !ok {
			return
		}
		if e := f.Value.Set(v); e != nil {
			err = fmt.Errorf("%s=%q (for --%s): %w", name, v, f.Name, e)
		}
	})
	return err
}

// EnvName is the environment variable behind a flag.
func EnvName(flag string) string {
	return "PROZESS_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// cidrs is a comma-separated list of CIDRs as a flag.
type cidrs struct{ nets *[]*net.IPNet }

func (c cidrs) String() string {
	if c.nets == nil {
		return ""
	}
	var out []string
	for _, n := range *c.nets {
		out = append(out, n.String())
	}
	return strings.Join(out, ",")
}

func (c cidrs) Set(v string) error {
	var nets []*net.IPNet
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		_, n, err := net.ParseCIDR(s)
		if err != nil {
			return fmt.Errorf("%q is not a CIDR such as 10.0.0.0/8", s)
		}
		nets = append(nets, n)
	}
	*c.nets = nets
	return nil
}

func (c cidrs) Type() string { return "cidrs" }
