package app

import (
	"fmt"
	"os"
	"strings"
	"time"

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
	Topic              string
	Partitions         int32
	HTTPAddr           string
	PaymentDeclineRate float64
	BrokerAddr         string // embedded broker, when KafkaBrokers is empty
	DataDir            string // embedded broker's data
	Seed               bool
	ShutdownTimeout    time.Duration
	LogLevel           string
	LogFormat          string
	PprofAddr          string        // serves net/http/pprof when set
	AdminAddr          string        // serves /metrics, /livez, /readyz when set
	NoAuth             bool          // authentication off, for local use only
	RateLimit          float64       // requests per second per API key
	RateBurst          int           // requests a key may burst above RateLimit
	HTTPReadTimeout    time.Duration // a request's headers and body must arrive within this
	KeyCacheTTL        time.Duration // how long the api may cache a valid API key (0: never)
	StatementTimeout   time.Duration // PostgreSQL statement_timeout for every connection
	KafkaLogLevel      string        // the Kafka client's own log level; empty for none

	// Fault, when set, is called at the consumers' fault points (tests).
	Fault saga.FaultFunc
	// TracerProvider, when set, traces with it instead of what the OTEL_
	// environment variables say (tests export to memory).
	TracerProvider trace.TracerProvider
}

// DefaultConfig returns the defaults, which work on a fresh machine with
// PostgreSQL and Redis on their standard local ports.
func DefaultConfig() Config {
	return Config{
		DatabaseURL:        "postgres://postgres@127.0.0.1:5432/prozess?sslmode=disable",
		RedisAddr:          "127.0.0.1:6379",
		RedisPrefix:        "prozess:",
		Topic:              "order-events",
		Partitions:         6,
		HTTPAddr:           ":8080",
		AdminAddr:          ":9464",
		PaymentDeclineRate: 0.15,
		BrokerAddr:         "127.0.0.1:9092",
		DataDir:            ".prozess/kafka",
		Seed:               true,
		ShutdownTimeout:    15 * time.Second,
		RateLimit:          50,
		RateBurst:          100,
		HTTPReadTimeout:    10 * time.Second,
		KeyCacheTTL:        10 * time.Second,
		StatementTimeout:   30 * time.Second,
		LogLevel:           "info",
		LogFormat:          "text",
	}
}

// DLQTopic is where records that can never be processed go.
func (c Config) DLQTopic() string { return c.Topic + ".dlq" }

func (c *Config) connectionFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.DatabaseURL, "database-url", c.DatabaseURL, "PostgreSQL connection URL (the database is created if missing)")
	fs.DurationVar(&c.StatementTimeout, "db-statement-timeout", c.StatementTimeout, "PostgreSQL statement_timeout for every query (0: none)")
	fs.StringVar(&c.RedisAddr, "redis-addr", c.RedisAddr, "Redis address, host:port")
	fs.StringVar(&c.RedisPrefix, "redis-prefix", c.RedisPrefix, "prefix of every Redis key, so deployments can share one Redis")
	fs.StringSliceVar(&c.KafkaBrokers, "kafka-brokers", c.KafkaBrokers, "Kafka bootstrap brokers, comma-separated; empty starts the embedded broker")
	fs.StringVar(&c.Topic, "topic", c.Topic, "the saga's topic (dead letters go to <topic>.dlq)")
}

// runningKafkaFlags are for commands that talk to the brokers of a running
// system (dlq, orders tail): they start no broker of their own, so
// requireBrokers insists on --kafka-brokers.
func (c *Config) runningKafkaFlags(fs *pflag.FlagSet) {
	fs.StringSliceVar(&c.KafkaBrokers, "kafka-brokers", c.KafkaBrokers, "Kafka bootstrap brokers, comma-separated")
	fs.StringVar(&c.Topic, "topic", c.Topic, "the saga's topic (dead letters are in <topic>.dlq)")
}

func (c Config) requireBrokers() error {
	if len(c.KafkaBrokers) == 0 {
		return fmt.Errorf("--kafka-brokers: name the brokers the system uses")
	}
	return nil
}

func (c *Config) logFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "log level: debug, info, warn, error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "log format: text or json")
}

func (c *Config) brokerFlags(fs *pflag.FlagSet, addrName string) {
	fs.StringVar(&c.BrokerAddr, addrName, c.BrokerAddr, "listen address of the embedded Kafka broker")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory for the embedded broker's data, kept across restarts")
}

func (c *Config) serveFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.HTTPAddr, "http-addr", c.HTTPAddr, "listen address of the HTTP API (api participant)")
	fs.Float64Var(&c.PaymentDeclineRate, "payment-decline-rate", c.PaymentDeclineRate, "share of simulated payments declined, 0 to 1")
	fs.Int32Var(&c.Partitions, "partitions", c.Partitions, "partitions of the saga topic when it is created")
	fs.BoolVar(&c.Seed, "seed", c.Seed, "load the demo catalogue and the demo API key at start (adds what is missing only; use false in production)")
	fs.BoolVar(&c.NoAuth, "no-auth", c.NoAuth, "turn API key authentication off: anyone may act as any user (local use only)")
	fs.Float64Var(&c.RateLimit, "rate-limit", c.RateLimit, "requests per second allowed per API key (0: unlimited)")
	fs.IntVar(&c.RateBurst, "rate-burst", c.RateBurst, "requests an API key may burst above --rate-limit")
	fs.DurationVar(&c.HTTPReadTimeout, "http-read-timeout", c.HTTPReadTimeout, "time a client has to send a request's headers and body")
	fs.DurationVar(&c.KeyCacheTTL, "key-cache-ttl", c.KeyCacheTTL,
		"how long the api may keep a valid API key in memory (revocations reach it at once); 0 looks every request's key up")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", c.ShutdownTimeout, "how long in-flight work may take to finish at shutdown")
	fs.StringVar(&c.AdminAddr, "admin-addr", c.AdminAddr, "listen address of /metrics, /livez and /readyz (empty: off)")
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
