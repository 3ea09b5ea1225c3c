package app_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/testpki"
	"github.com/prozess/prozess/modules/event"
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
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal("redis-server not found (apt-get install redis-server; .ci/services does)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(bin, "--port", "0", "--tls-port", port, "--bind", "127.0.0.1",
		"--tls-cert-file", p.Cert, "--tls-key-file", p.Key, "--tls-ca-cert-file", p.CA, "--tls-auth-clients", "no",
		"--save", "", "--appendonly", "no", "--dir", t.TempDir(),
		"--user", "default", "off",
		"--user", user, "on", ">"+password, "~*", "&*", "+@all")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server with TLS did not listen on %s within 10s:\n%s", addr, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// String is everything written so far.
func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The saga end to end over secured connections: PostgreSQL with
// sslmode=require, Redis over TLS with an ACL user and a password from a
// file, and Kafka over SASL_SSL (SCRAM-SHA-512) when the test cluster has
// that listener (PROZESS_TEST_KAFKA_SASL_BROKERS), else the test's own
// broker. No secret appears in any log line of the run, at debug level.
// Then what must fail at start does, with one line naming the server and
// no secret: a wrong Redis password, a Redis certificate from an untrusted
// CA, a wrong Kafka password and an untrusted Kafka CA.
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
	secrets := []string{redisPassword}
	if sasl := os.Getenv("PROZESS_TEST_KAFKA_SASL_BROKERS"); sasl != "" {
		kafkaPassword := os.Getenv("PROZESS_TEST_KAFKA_SASL_PASSWORD")
		kpw := filepath.Join(dir, "kafka-password")
		if err := os.WriteFile(kpw, []byte(kafkaPassword), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg.KafkaBrokers = strings.Split(sasl, ",")
		cfg.KafkaSecurity.TLS.CAFile = os.Getenv("PROZESS_TEST_KAFKA_CA_FILE")
		cfg.KafkaSecurity.SASLMechanism = "SCRAM-SHA-512"
		cfg.KafkaSecurity.SASLUser = os.Getenv("PROZESS_TEST_KAFKA_SASL_USER")
		cfg.KafkaSecurity.SASLPasswordFile = kpw
		secrets = append(secrets, kafkaPassword)
	} else if os.Getenv("PROZESS_TEST_KAFKA_BROKERS") != "" {
		t.Fatal("PROZESS_TEST_KAFKA_BROKERS is set but PROZESS_TEST_KAFKA_SASL_BROKERS is not: the cluster has no SASL_SSL listener")
	}

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
	// The api's cache is the secured Redis, and PostgreSQL's sessions are
	// encrypted.
	var o struct{ Status string }
	r.getJSON(t, "/orders/"+r.order(t, "u1", "", mouse(1)).OrderID.String(), &o)
	pool, err := pgxpool.New(t.Context(), cfg.DatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var ssl bool
	if err := pool.QueryRow(t.Context(), `SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()`).Scan(&ssl); err != nil || !ssl {
		t.Fatalf("the PostgreSQL session is not encrypted (ssl %v, %v)", ssl, err)
	}
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
	wrongPw := filepath.Join(dir, "wrong")
	if err := os.WriteFile(wrongPw, []byte("not-the-password"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		mangle func(*app.Config)
		want   string
	}{
		{"wrong redis password", func(c *app.Config) { c.RedisSecurity.PasswordFile = wrongPw }, "Redis at " + redisAddr},
		{"untrusted redis certificate", func(c *app.Config) { c.RedisSecurity.TLS.CAFile = p.OtherCA }, "Redis at " + redisAddr},
	}
	if len(secrets) > 1 {
		cases = append(cases,
			struct {
				name   string
				mangle func(*app.Config)
				want   string
			}{"wrong kafka password", func(c *app.Config) { c.KafkaSecurity.SASLPasswordFile = wrongPw }, "Kafka at"},
			struct {
				name   string
				mangle func(*app.Config)
				want   string
			}{"untrusted kafka certificate", func(c *app.Config) { c.KafkaSecurity.TLS.CAFile = p.OtherCA }, "Kafka at"})
	}
	for _, tc := range cases {
		err := startErr(tc.mangle)
		switch {
		case err == nil:
			t.Errorf("%s: started", tc.name)
		case !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n"):
			t.Errorf("%s: %q, want one line naming %q", tc.name, err, tc.want)
		case strings.Contains(err.Error(), redisPassword) || strings.Contains(err.Error(), "not-the-password") ||
			len(secrets) > 1 && strings.Contains(err.Error(), secrets[1]):
			t.Errorf("%s: a secret in the error", tc.name)
		default:
			t.Logf("%s: %s", tc.name, err)
		}
	}
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
