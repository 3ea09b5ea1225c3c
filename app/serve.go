package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/oklog/run"
	"github.com/redis/rueidis"

	"github.com/prozess/prozess/app/embedded"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/delivery"
	"github.com/prozess/prozess/modules/inventory"
	"github.com/prozess/prozess/modules/payment"
	"github.com/prozess/prozess/modules/status"
	"github.com/prozess/prozess/modules/statuscache"
	"github.com/prozess/prozess/schema"
	"github.com/prozess/prozess/seed"
)

// Participants lists every participant `serve` can run, in saga order; `all`
// is just a name for this list.
func Participants() []string {
	return []string{api.Name, inventory.Name, payment.Name, delivery.Name, status.Name}
}

// deps are the shared clients participants are built from.
type deps struct {
	cfg    Config
	log    *slog.Logger
	pool   *pgxpool.Pool
	rdb    rueidis.Client
	prefix string // Redis keys' prefix, bound to this database
}

// consumer is one row of the participants table: a name and a constructor.
type consumer struct {
	name  string
	build func(d deps) (saga.Handler, error)
}

// consumers is the table of consumer participants.
func consumers() []consumer {
	return []consumer{
		{inventory.Name, func(d deps) (saga.Handler, error) { return inventory.New(d.log), nil }},
		{payment.Name, func(d deps) (saga.Handler, error) {
			return payment.New(d.log, d.cfg.PaymentDeclineRate, rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())))
		}},
		{delivery.Name, func(d deps) (saga.Handler, error) { return delivery.New(d.log), nil }},
		{status.Name, func(d deps) (saga.Handler, error) {
			return status.New(d.log, statuscache.New(d.rdb, d.prefix)), nil
		}},
	}
}

// ParseParticipants expands `all` and rejects unknown names.
func ParseParticipants(args []string) ([]string, error) {
	all := Participants()
	if len(args) == 0 {
		return nil, fmt.Errorf("name at least one participant (%s) or all", strings.Join(all, ", "))
	}
	var out []string
	for _, a := range args {
		if a == "all" {
			return all, nil
		}
		if !slices.Contains(all, a) {
			return nil, fmt.Errorf("unknown participant %q: want %s or all", a, strings.Join(all, ", "))
		}
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out, nil
}

// System is a running set of participants in one process.
type System struct {
	log       *slog.Logger
	cfg       Config
	group     run.Group
	closers   []func() // in creation order; closed in reverse
	httpAddr  string
	adminAddr string
	brokers   []string
	kafka     saga.Conn // brokers, with TLS and SASL when configured
	stats     map[string]*saga.ConsumerStats
	metrics   *telemetry.Metrics
	tracing   *telemetry.Tracing
	ready     func(ctx context.Context) error
	draining  atomic.Bool // shutting down: /readyz fails while requests are still served
}

// AdminAddr is where /metrics, /livez and /readyz are served (empty when off).
func (s *System) AdminAddr() string { return s.adminAddr }

// Stats returns each consumer participant's counters.
func (s *System) Stats() map[string]*saga.ConsumerStats { return s.stats }

// HTTPAddr is where the api listens (empty when it is not served).
func (s *System) HTTPAddr() string { return s.httpAddr }

// Brokers are the Kafka brokers the system talks to.
func (s *System) Brokers() []string { return s.brokers }

// NewSystem connects every client the participants need, prepares the
// database and topics, and builds the participants' actors. Every client is
// pinged here, so an unreachable dependency fails the start with one clear
// line.
func NewSystem(ctx context.Context, cfg Config, names []string, log *slog.Logger) (_ *System, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &System{log: log, cfg: cfg, stats: map[string]*saga.ConsumerStats{}, metrics: newMetrics()}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if cfg.TracerProvider != nil {
		s.tracing = telemetry.NewTracing(cfg.TracerProvider)
	} else {
		t, stop, err := telemetry.TracingFromEnv(startCtx, serviceName(names))
		if err != nil {
			return nil, err
		}
		s.tracing = t
		s.closers = append(s.closers, stop) // closed last: flushes every span
	}

	if cfg, err = s.startEmbedded(ctx, cfg, names); err != nil {
		return nil, err
	}
	s.cfg = cfg
	pool, err := OpenDB(startCtx, cfg.DatabaseURL, cfg.StatementTimeout, log)
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, pool.Close)
	if cfg.Migrate {
		if _, err := schema.Migrate(startCtx, pool); err != nil {
			return nil, err
		}
	} else if err := requireSchema(startCtx, pool); err != nil {
		return nil, fmt.Errorf("--migrate=false: %w", err)
	}
	// The public demo key only ever works for an api on loopback (the
	// quick start), or in a declared demo.
	demoOK := cfg.Demo || slices.Contains(names, api.Name) && loopbackOnly(cfg.HTTPAddr)
	if cfg.Seed {
		n, err := seed.Load(startCtx, pool, demoOK)
		if err != nil {
			return nil, err
		}
		if n > 0 {
			log.Info("demo catalogue loaded", "products", n)
		}
	}
	d := deps{cfg: cfg, log: log, pool: pool}
	if slices.Contains(names, api.Name) || slices.Contains(names, status.Name) {
		auth, err := cfg.RedisSecurity.auth()
		if err != nil {
			return nil, err
		}
		if d.rdb, err = OpenRedis(cfg.RedisAddr, auth); err != nil {
			return nil, err
		}
		s.closers = append(s.closers, d.rdb.Close)
		// Every key under this database's deployment id and copy: a Redis
		// shared with another deployment, or a clone, never answers for it.
		if d.prefix, err = statuscache.BoundPrefix(startCtx, pool, cfg.RedisPrefix); err != nil {
			return nil, err
		}
	}

	if len(cfg.KafkaBrokers) > 0 {
		s.brokers = cfg.KafkaBrokers
	} // else startEmbedded started the broker
	// TLS and SASL apply to --kafka-brokers; the embedded broker is plain.
	if s.kafka, err = cfg.KafkaSecurity.conn(s.brokers); err != nil {
		return nil, err
	}
	if len(cfg.KafkaBrokers) == 0 {
		s.kafka = saga.Conn{Brokers: s.brokers}
	}
	s.kafka.Dial = cfg.KafkaDial
	if err := saga.EnsureTopics(startCtx, s.kafka, saga.Topics{Topic: cfg.Topic, DLQ: cfg.DLQTopic(), Partitions: cfg.Partitions,
		ReplicationFactor: cfg.ReplicationFactor, MinInSync: cfg.MinInSync, DLQRetention: cfg.DLQRetention, Strict: cfg.StrictTopics}, log); err != nil {
		return nil, err
	}

	s.addActor(func(ctx context.Context) error {
		return saga.RunInboxPruner(ctx, pool, s.kafka, cfg.Topic, cfg.InboxMargin, 10*time.Minute, log.With("participant", "inbox"))
	})

	relay, err := saga.NewRelay(log.With("participant", "relay"), pool, s.kafka, cfg.Fault, s.metrics, s.tracing)
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, relay.Close)
	s.addActor(relay.Run)
	s.metrics.RegisterFlag("prozess_relay_leader", "1 while this process's relay holds the outbox lock (one leader per database), else 0.", relay.Leading)
	signal := saga.NewOutboxSignal(relay, pool, log.With("participant", "relay"))
	s.addActor(signal.Run)

	if slices.Contains(names, api.Name) {
		alog := log.With("participant", api.Name)
		auth := api.AuthConfig{Disabled: cfg.NoAuth, Rate: cfg.RateLimit, Burst: cfg.RateBurst, KeyCacheTTL: cfg.KeyCacheTTL,
			FailRate: cfg.AuthFailRate, FailBurst: cfg.AuthFailBurst}
		if cfg.NoAuth {
			alog.Warn("AUTHENTICATION IS OFF (--no-auth): anyone can place orders as any user and read every order; never expose this")
		} else if active, err := demoKeyActive(startCtx, pool); err != nil {
			return nil, err
		} else if active && !demoOK {
			return nil, fmt.Errorf("the public demo API key (%s) is active in this database and --http-addr %s listens beyond loopback: "+
				"revoke it (prozess apikey revoke %s), or pass --demo if this really is a demo", seed.DemoKeyID, cfg.HTTPAddr, seed.DemoKeyID)
		} else if active {
			alog.Warn("the public demo API key is active; for anything but a demo run with --seed=false and revoke it",
				"key", seed.DemoKey, "user", seed.DemoUser, "revoke", "prozess apikey revoke "+seed.DemoKeyID)
			auth.DemoKey = seed.DemoKey
		} else if !demoOK {
			alog.Info("no demo API key: --http-addr listens beyond loopback; create keys with prozess apikey create", "http_addr", cfg.HTTPAddr)
		}
		kafka := s.kafka
		a := api.New(alog, pool, d.rdb, api.Config{Prefix: d.prefix, Topic: cfg.Topic, Auth: auth, SagaDeadline: cfg.SagaDeadline,
			OutboxCommitted: signal.Committed, Participants: Participants(),
			// An admin's re-drive is refused past the inboxes' memory, as
			// `prozess dlq replay` refuses it.
			ReplayGuard: func(ctx context.Context, age time.Duration) error {
				retention, err := saga.InboxRetention(ctx, kafka, cfg.Topic, cfg.InboxMargin)
				if err != nil {
					return err
				}
				if err := deadletter.TooOld(age, retention, cfg.Topic); err != nil {
					return fmt.Errorf("the event is %w", err)
				}
				return nil
			}})
		if err := s.addHTTP(a); err != nil {
			return nil, err
		}
		s.addLiveFeed(a)
		s.metrics.RegisterCounterFunc("prozess_api_key_lookups_total",
			"API key lookups that reached PostgreSQL (cache misses; bounded per client address by --auth-fail-rate).",
			func() float64 { return float64(a.KeyLookups()) })
	}
	var joined []*saga.Consumer
	for _, p := range consumers() {
		if !slices.Contains(names, p.name) {
			continue
		}
		plog := log.With("participant", p.name)
		h, err := p.build(deps{cfg: cfg, log: plog, pool: pool, rdb: d.rdb, prefix: d.prefix})
		if err != nil {
			return nil, fmt.Errorf("building %s: %w", p.name, err)
		}
		var onDead func(context.Context, []uuid.UUID)
		if d.rdb != nil {
			cache := statuscache.New(d.rdb, d.prefix)
			onDead = func(ctx context.Context, orders []uuid.UUID) {
				ctx, cancel := context.WithTimeout(ctx, time.Second)
				defer cancel()
				if err := cache.Hold(ctx, orders); err != nil {
					plog.Warn("status cache entries of dead-lettered orders not held; they heal within a minute", "orders", len(orders), "err", err)
				}
			}
		}
		c, err := saga.NewConsumer(p.name, plog, pool, h, saga.ConsumerConfig{
			OnDeadLetter: onDead, OutboxCommitted: signal.Committed,
			Kafka: s.kafka, Topic: cfg.Topic, DLQTopic: cfg.DLQTopic(), Fault: cfg.Fault, KafkaLog: saga.KafkaLogger(cfg.KafkaLogLevel, plog),
			Group: cfg.GroupPrefix + p.name, InstanceID: cfg.InstanceID, ResetOutOfRange: cfg.ResetOutOfRange, PoisonAfter: cfg.PoisonAfter,
			GiveUpAfter: cfg.GiveUpAfter, SessionTimeout: cfg.SessionTimeout,
			Metrics: s.metrics, Tracing: s.tracing,
		})
		if err != nil {
			return nil, err
		}
		s.closers = append(s.closers, c.Close)
		s.stats[p.name] = c.Stats()
		joined = append(joined, c)
		s.addActor(c.Run)
	}
	if slices.Contains(names, status.Name) {
		x := status.NewExpirer(log.With("participant", "expirer"), pool, cfg.Topic, cfg.SagaDeadline, signal.Committed)
		s.addActor(func(ctx context.Context) error {
			return x.Run(ctx, min(max(cfg.SagaDeadline/10, 100*time.Millisecond), 10*time.Second), s.metrics.ObserveSweep)
		})
	}
	watched := make(map[string]telemetry.Consumer, len(joined))
	for _, c := range joined {
		watched[c.Name()] = c.Telemetry()
	}
	s.metrics.Register(telemetry.NewStateCollector(pool, relay.Admin(), watched))
	notReady := readiness(pool, relay, joined)
	s.ready = func(ctx context.Context) error {
		if s.draining.Load() {
			return errors.New("shutting down")
		}
		return notReady(ctx)
	}
	if addr := adminAddr(cfg.AdminAddr, names); addr != "" {
		if err := s.addAdmin(addr); err != nil {
			return nil, err
		}
	}
	if cfg.PprofAddr != "" {
		if err := s.addPprof(cfg.PprofAddr); err != nil {
			return nil, err
		}
	}
	log.Info("prozess ready", "participants", names, "tracing", s.tracing != nil, "http", s.httpAddr, "admin", s.adminAddr, "kafka", s.brokers, "topic", cfg.Topic)
	return s, nil
}

// startEmbedded starts, for `serve all`, what cfg names no server for:
// PostgreSQL without a database URL, Redis without an address, the broker
// without brokers, each on its --embedded-*-addr (or --broker-addr): the
// usual port, or a free one when that is taken. Their data goes in
// --data-dir, which it locks first, and where they listen is recorded
// there for the other commands. Other participant mixes never start a
// server: they use the addresses given, else those a running `serve all`
// or `dev` recorded in --data-dir. It returns cfg with the database and
// Redis addresses filled in; the embedded broker's are in s.brokers.
func (s *System) startEmbedded(ctx context.Context, cfg Config, names []string) (Config, error) {
	if len(names) != len(Participants()) {
		var err error
		if cfg.DatabaseURL, err = cfg.databaseURL(); err != nil {
			return cfg, err
		}
		if cfg.KafkaBrokers, err = cfg.brokers(); err != nil {
			return cfg, err
		}
		if slices.Contains(names, api.Name) || slices.Contains(names, status.Name) {
			if cfg.RedisAddr, err = cfg.redisAddr(); err != nil {
				return cfg, err
			}
		}
		return cfg, nil
	}
	given := map[string]bool{"--database-url": cfg.DatabaseURL != "", "--redis-addr": cfg.RedisAddr != "", "--kafka-brokers": len(cfg.KafkaBrokers) > 0}
	var missing, named []string
	for _, f := range []string{"--database-url", "--redis-addr", "--kafka-brokers"} {
		if given[f] {
			named = append(named, f)
		} else {
			missing = append(missing, f)
		}
	}
	if len(missing) == 0 {
		return cfg, nil
	}
	// An address given says "a real deployment": one missing beside it is
	// a slip (a misspelt variable), and an embedded server there would keep
	// orders on a throwaway disk.
	if len(named) > 0 && !cfg.Embedded {
		return cfg, fmt.Errorf("serve all got %s but not %s: give %s too, or pass --embedded to run the missing servers in this process (development only)",
			strings.Join(named, ", "), strings.Join(missing, ", "), strings.Join(missing, ", "))
	}
	unlock, err := embedded.LockDataDir(cfg.DataDir)
	if err != nil {
		return cfg, err
	}
	s.closers = append(s.closers, unlock)
	var rec embedded.Servers
	if cfg.DatabaseURL == "" {
		pg, err := embedded.StartPostgres(ctx, filepath.Join(cfg.DataDir, "postgres"), cfg.EmbeddedPostgresAddr, "", s.log)
		if err != nil {
			return cfg, err
		}
		s.closers = append(s.closers, func() {
			if err := pg.Stop(); err != nil {
				s.log.Error("embedded PostgreSQL", "err", err)
			}
		})
		cfg.DatabaseURL = pg.URL("prozess")
		rec.DatabaseURL = cfg.DatabaseURL
	}
	if cfg.RedisAddr == "" {
		r, err := embedded.StartRedis(cfg.EmbeddedRedisAddr, s.log)
		if err != nil {
			return cfg, err
		}
		s.closers = append(s.closers, r.Close)
		cfg.RedisAddr = r.Addr()
		rec.RedisAddr = cfg.RedisAddr
	}
	if len(cfg.KafkaBrokers) == 0 {
		b, err := cfg.startBroker(s.log)
		if err != nil {
			return cfg, err
		}
		s.closers = append(s.closers, b.Close)
		s.brokers = b.ListenAddrs()
		rec.KafkaBrokers = s.brokers
	}
	if err := recordServers(cfg.DataDir, rec); err != nil {
		return cfg, err
	}
	s.closers = append(s.closers, func() { embedded.RemoveServers(cfg.DataDir) })
	return cfg, nil
}

// adminAddr resolves --admin-addr: auto gives each participant its own
// port, that of the first one named, so participants in separate processes
// on one machine never collide (all and api share :9464).
func adminAddr(flag string, names []string) string {
	if flag != AdminAuto {
		return flag
	}
	// Loopback only: metrics publish business figures. A scraper on
	// another host needs --admin-addr set to an address it can reach.
	for i, p := range Participants() {
		if len(names) > 0 && names[0] == p {
			return fmt.Sprintf("127.0.0.1:%d", 9464+i)
		}
	}
	return "127.0.0.1:9464"
}

// addActor runs fn until the group is interrupted.
func (s *System) addActor(fn func(ctx context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	s.group.Add(func() error { return fn(ctx) }, func(error) { cancel() })
}

// Run runs every actor until ctx is cancelled or one of them fails, then
// closes the clients in reverse order of creation, so actors always stop
// before the clients they use.
func (s *System) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	s.group.Add(func() error {
		<-ctx.Done()
		return nil
	}, func(error) { cancel() })
	err := s.group.Run()
	s.close()
	s.log.Info("prozess stopped")
	return err
}

func (s *System) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
	s.closers = nil
}

// OpenRedis connects to Redis and fails with one clear line if it cannot.
func OpenRedis(addr string, auth RedisAuth) (rueidis.Client, error) {
	rdb, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress:       []string{addr},
		Username:          auth.Username,
		Password:          auth.Password,
		TLSConfig:         auth.TLS,
		DisableCache:      true,
		ConnWriteTimeout:  5 * time.Second,
		Dialer:            net.Dialer{Timeout: 5 * time.Second},
		ForceSingleClient: true,
	})
	if err != nil {
		return nil, fmt.Errorf("cannot reach Redis at %s: %s", addr, redact(err.Error(), auth.Password))
	}
	return rdb, nil
}

// loopbackOnly reports whether addr (host:port) listens on loopback only;
// an empty host or 0.0.0.0 listens on every interface.
func loopbackOnly(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// demoKeyActive reports whether the public demo API key still works.
func demoKeyActive(ctx context.Context, pool *pgxpool.Pool) (bool, error) {
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM api_keys WHERE id = $1 AND revoked_at IS NULL`, seed.DemoKeyID).Scan(&n); err != nil {
		return false, fmt.Errorf("reading API keys: %w", err)
	}
	return n > 0, nil
}

// readiness is ready when PostgreSQL and the broker answer and every
// consumer is a member of its group.
func readiness(pool *pgxpool.Pool, relay *saga.Relay, consumers []*saga.Consumer) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		if err := pool.Ping(ctx); err != nil {
			return fmt.Errorf("PostgreSQL: %s", oneLine(err))
		}
		if err := relay.Ping(ctx); err != nil {
			return fmt.Errorf("Kafka: %s", oneLine(err))
		}
		for _, c := range consumers {
			if !c.Joined() {
				return fmt.Errorf("%s has not joined its consumer group", c.Name())
			}
		}
		return nil
	}
}

// serviceName names the traced service for the participants it runs:
// prozess for all of them, prozess-payment for one.
func serviceName(participants []string) string {
	if len(participants) == 0 || len(participants) == len(Participants()) {
		return "prozess"
	}
	return "prozess-" + strings.Join(participants, "-")
}
