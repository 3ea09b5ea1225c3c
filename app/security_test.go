package app_test

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/testpki"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// newPKI writes the test's own certificates (app/testpki).
func newPKI(t *testing.T) (testpki.Files, string) {
	t.Helper()
	dir := t.TempDir()
	f, err := testpki.Write(dir, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return f, dir
}

// secureRedis starts a redis-server of the test's own that accepts only
// TLS (certificates from p) and only the ACL user it is given, and returns
// its address.
func secureRedis(t *testing.T, p testpki.Files, user, password string) string {
	t.Helper()
	addr, _ := schematest.RedisServer(t, "--tls-port", "--port", "0",
		"--tls-cert-file", p.Cert, "--tls-key-file", p.Key, "--tls-ca-cert-file", p.CA, "--tls-auth-clients", "no",
		"--user", "default", "off",
		"--user", user, "on", ">"+password, "~*", "&*", "+@all")
	return addr
}

// String is everything written so far.
func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The saga end to end over secured connections: PostgreSQL with
// sslmode=require, Redis over TLS with an ACL user and a password from a
// file, and Kafka over SASL_SSL (SCRAM-SHA-512): the test cluster's
// listener when there is one (PROZESS_TEST_KAFKA_SASL_BROKERS, Apache Kafka
// in CI), else a kfake broker of the test's own with TLS and SCRAM. Every
// PostgreSQL session the system opens is encrypted, and no secret appears
// in any log line of the run, at debug level. Then what must fail at start
// does, for the reason it stands for, with one line naming the server and
// no secret: a wrong Redis password (WRONGPASS), a Redis certificate from
// an untrusted CA (x509), a wrong Kafka password (SASL authentication
// failed) and an untrusted Kafka CA (x509).
func TestSagaOverSecuredConnections(t *testing.T) {
	if os.Getenv("PROZESS_TEST_DATABASE_URL") == "" {
		t.Skip("needs the machine's PostgreSQL with ssl on (PROZESS_TEST_DATABASE_URL); the embedded one has no TLS")
	}
	e := newEnv(t)
	p, dir := newPKI(t)
	const redisUser, redisPassword = "prozess-app", "redis-pw-4f1c9e0b77d2"
	redisAddr := secureRedis(t, p, redisUser, redisPassword)
	pwFile := filepath.Join(dir, "redis-password")
	if err := os.WriteFile(pwFile, []byte(redisPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	cfg := e.config()
	cfg.DatabaseURL = requireSSL(e.dbURL)
	cfg.RedisAddr = redisAddr
	cfg.RedisSecurity.Username, cfg.RedisSecurity.PasswordFile = redisUser, pwFile
	cfg.RedisSecurity.TLS.CAFile = p.CA
	kafkaUser, kafkaPassword, kafkaCA := "prozess-app", "kafka-pw-9d0e6a41c3b8", p.CA
	// Apache Kafka answers a wrong password with SASL_AUTHENTICATION_FAILED;
	// kfake hangs up on the SCRAM proof instead (EOF), so there the test
	// also counts the SASLAuthenticate requests that reached it: a failure
	// at the proof is the second of the exchange.
	kafkaAuthFailed := []string{"SASL_AUTHENTICATION_FAILED"}
	var saslAuths *atomic.Int64
	if sasl := os.Getenv("PROZESS_TEST_KAFKA_SASL_BROKERS"); sasl != "" {
		kafkaUser, kafkaPassword = os.Getenv("PROZESS_TEST_KAFKA_SASL_USER"), os.Getenv("PROZESS_TEST_KAFKA_SASL_PASSWORD")
		kafkaCA = os.Getenv("PROZESS_TEST_KAFKA_CA_FILE")
		cfg.KafkaBrokers = strings.Split(sasl, ",")
	} else if os.Getenv("PROZESS_TEST_KAFKA_BROKERS") != "" {
		t.Fatal("PROZESS_TEST_KAFKA_BROKERS is set but PROZESS_TEST_KAFKA_SASL_BROKERS is not: the cluster has no SASL_SSL listener")
	} else {
		t.Log("no PROZESS_TEST_KAFKA_SASL_BROKERS: Kafka over SASL_SSL on a kfake broker of the test's own (CI runs this against Apache Kafka's SASL_SSL listener)")
		cert, err := tls.LoadX509KeyPair(p.Cert, p.Key)
		if err != nil {
			t.Fatal(err)
		}
		c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.TLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}),
			kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-512", kafkaUser, kafkaPassword))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		cfg.KafkaBrokers = c.ListenAddrs()
		kafkaAuthFailed = []string{"EOF"}
		saslAuths = new(atomic.Int64)
		c.ControlKey(int16(kmsg.SASLAuthenticate), func(kmsg.Request) (kmsg.Response, error, bool) {
			saslAuths.Add(1)
			return nil, nil, false // only counted
		})
	}
	kpw := filepath.Join(dir, "kafka-password")
	if err := os.WriteFile(kpw, []byte(kafkaPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.KafkaSecurity.TLS.CAFile = kafkaCA
	cfg.KafkaSecurity.SASLMechanism = "SCRAM-SHA-512"
	cfg.KafkaSecurity.SASLUser = kafkaUser
	cfg.KafkaSecurity.SASLPasswordFile = kpw
	secrets := []string{redisPassword, kafkaPassword}

	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.KafkaLogLevel = "debug"
	r := e.startLogged(cfg, log)
	for range 3 {
		id := r.order(t, "u1", "", mouse(1)).OrderID.String()
		if o := r.await(t, id, 60*time.Second); o.Status != event.StatusShipped {
			t.Fatalf("order ended %s", o.Status)
		}
	}
	// The api's cache is the secured Redis.
	var o struct{ Status string }
	r.getJSON(t, "/orders/"+r.order(t, "u1", "", mouse(1)).OrderID.String(), &o)
	assertSystemSessionsEncrypted(t, e, cfg.DatabaseURL)
	r.shutdown(t)
	if logs.String() == "" {
		t.Fatal("no log lines to check")
	}
	for _, s := range secrets {
		if strings.Contains(logs.String(), s) {
			t.Fatalf("a secret appears in the log")
		}
	}

	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	startErr := func(mangle func(*app.Config)) error {
		c := cfg
		mangle(&c)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		s, err := app.NewSystem(ctx, c, app.Participants(), quiet)
		if err == nil {
			s.Run(canceled())
		}
		return err
	}
	const wrongPassword = "not-the-password"
	wrongPw := filepath.Join(dir, "wrong")
	if err := os.WriteFile(wrongPw, []byte(wrongPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	const unknownAuthority = "x509: certificate signed by unknown authority"
	for _, tc := range []struct {
		name      string
		mangle    func(*app.Config)
		server    string
		causes    []string // the error names one of these
		saslAuths string   // on kfake: "proof", the client reached the SCRAM proof; "none", no SASL at all; "": not counted
	}{
		{"wrong redis password", func(c *app.Config) { c.RedisSecurity.PasswordFile = wrongPw },
			"Redis at " + redisAddr, []string{"WRONGPASS"}, ""},
		{"untrusted redis certificate", func(c *app.Config) { c.RedisSecurity.TLS.CAFile = p.OtherCA },
			"Redis at " + redisAddr, []string{unknownAuthority}, ""},
		{"wrong kafka password", func(c *app.Config) { c.KafkaSecurity.SASLPasswordFile = wrongPw },
			"Kafka at", kafkaAuthFailed, "proof"},
		{"untrusted kafka certificate", func(c *app.Config) { c.KafkaSecurity.TLS.CAFile = p.OtherCA },
			"Kafka at", []string{unknownAuthority}, "none"},
	} {
		var authsBefore int64
		if saslAuths != nil {
			authsBefore = saslAuths.Load()
		}
		err := startErr(tc.mangle)
		if saslAuths != nil && tc.saslAuths != "" {
			if n := saslAuths.Load() - authsBefore; tc.saslAuths == "proof" && n < 2 || tc.saslAuths == "none" && n != 0 {
				t.Errorf("%s: %d SASLAuthenticate requests reached kfake, want %s", tc.name, n,
					map[string]string{"proof": "2 or more (the SCRAM proof)", "none": "none"}[tc.saslAuths])
			}
		}
		if err == nil {
			t.Errorf("%s: started", tc.name)
			continue
		}
		msg := err.Error()
		switch {
		case !strings.Contains(msg, tc.server) || strings.Contains(msg, "\n"):
			t.Errorf("%s: %q, want one line naming %q", tc.name, msg, tc.server)
		case !slices.ContainsFunc(tc.causes, func(c string) bool { return strings.Contains(msg, c) }):
			t.Errorf("%s: %q, want the cause: one of %q", tc.name, msg, tc.causes)
		case slices.ContainsFunc(append(slices.Clone(secrets), wrongPassword), func(s string) bool { return strings.Contains(msg, s) }):
			t.Errorf("%s: a secret in the error", tc.name)
		default:
			t.Logf("%s: %s", tc.name, msg)
		}
	}
}

// assertSystemSessionsEncrypted checks, while the system runs, that every
// session it holds on its database is encrypted: every session on the
// test's own database but the env's pool and this check's, read from
// pg_stat_activity joined with pg_stat_ssl.
func assertSystemSessionsEncrypted(t *testing.T, e *env, url string) {
	t.Helper()
	ctx := t.Context()
	// The env's pool (API keys) connects without TLS: its sessions are
	// the test's, held while the check runs so it opens no other.
	var mine []uint32
	for _, c := range e.pool.AcquireAllIdle(ctx) {
		mine = append(mine, c.Conn().PgConn().PID())
		defer c.Release()
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, `
		SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.backend_type, ''), coalesce(s.ssl, false)
		FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s ON s.pid = a.pid
		WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.pid <> ALL($1::int[])`, mine)
	if err != nil {
		t.Fatal(err)
	}
	type session struct {
		PID          int32
		App, Backend string
		SSL          bool
	}
	sessions, err := pgx.CollectRows(rows, pgx.RowToStructByPos[session])
	if err != nil {
		t.Fatal(err)
	}
	// At least the pool's, the relay's lease session and the api's
	// LISTEN for key revocations.
	if len(sessions) < 3 {
		t.Fatalf("the system holds %d sessions on its database (%+v), want at least 3", len(sessions), sessions)
	}
	encrypted := 0
	for _, s := range sessions {
		if !s.SSL {
			t.Errorf("a session of the system is not encrypted: pid %d, application_name %q, %s", s.PID, s.App, s.Backend)
			continue
		}
		encrypted++
	}
	t.Logf("%d sessions of the system on its database, %d encrypted", len(sessions), encrypted)
}

// requireSSL is a PostgreSQL URL with sslmode=require instead of what it had.
func requireSSL(url string) string {
	for _, m := range []string{"disable", "allow", "prefer"} {
		url = strings.ReplaceAll(url, "sslmode="+m, "sslmode=require")
	}
	if !strings.Contains(url, "sslmode=") {
		sep := "?"
		if strings.Contains(url, "?") {
			sep = "&"
		}
		url += sep + "sslmode=require"
	}
	return url
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}
