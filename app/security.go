package app

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/pflag"
	"github.com/twmb/franz-go/pkg/sasl"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/prozess/prozess/app/saga"
)

// TLSFiles is how prozess verifies a server and, optionally, proves
// itself to it: PEM files, never the secrets themselves on the command
// line.
type TLSFiles struct {
	Enabled    bool
	CAFile     string // trusted CAs; empty: the system's
	CertFile   string // client certificate (mutual TLS), with KeyFile
	KeyFile    string
	ServerName string // the name the server's certificate must carry; empty: the host dialled
}

func (t *TLSFiles) flags(fs *pflag.FlagSet, prefix, server string) {
	fs.BoolVar(&t.Enabled, prefix+"-tls", t.Enabled, "connect to "+server+" over TLS (implied by any other --"+prefix+"-tls-* flag)")
	fs.StringVar(&t.CAFile, prefix+"-tls-ca-file", t.CAFile, "PEM file of the CAs that sign "+server+"'s certificates (empty: the system's)")
	fs.StringVar(&t.CertFile, prefix+"-tls-cert-file", t.CertFile, "PEM client certificate for "+server+" (mutual TLS), with --"+prefix+"-tls-key-file")
	fs.StringVar(&t.KeyFile, prefix+"-tls-key-file", t.KeyFile, "PEM private key of --"+prefix+"-tls-cert-file")
	fs.StringVar(&t.ServerName, prefix+"-tls-server-name", t.ServerName, "the name "+server+"'s certificate must carry (empty: the host dialled)")
}

// config builds the tls.Config, or nil when TLS is off. flag names the
// flags' prefix for errors.
func (t TLSFiles) config(flag string) (*tls.Config, error) {
	if !t.Enabled && t.CAFile == "" && t.CertFile == "" && t.KeyFile == "" && t.ServerName == "" {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--%s-tls-ca-file: %w", flag, err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--%s-tls-ca-file %s: no PEM certificate in it", flag, t.CAFile)
		}
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return nil, fmt.Errorf("--%s-tls-cert-file and --%s-tls-key-file go together", flag, flag)
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("--%s-tls-cert-file %s, --%s-tls-key-file %s: %w", flag, t.CertFile, flag, t.KeyFile, err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// KafkaSecurity is TLS and SASL for every Kafka client prozess creates.
type KafkaSecurity struct {
	TLS           TLSFiles
	SASLMechanism string // PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; empty: none
	SASLUser      string
	// SASLPasswordFile holds the password; without it the password comes
	// from PROZESS_KAFKA_SASL_PASSWORD. There is no flag for the password
	// itself: a flag's value shows in ps and in --help.
	SASLPasswordFile string
}

func (k *KafkaSecurity) flags(fs *pflag.FlagSet) {
	k.TLS.flags(fs, "kafka", "Kafka")
	fs.StringVar(&k.SASLMechanism, "kafka-sasl-mechanism", k.SASLMechanism, "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (empty: no SASL)")
	fs.StringVar(&k.SASLUser, "kafka-sasl-username", k.SASLUser, "SASL user name")
	fs.StringVar(&k.SASLPasswordFile, "kafka-sasl-password-file", k.SASLPasswordFile,
		"file holding the SASL password (else the environment variable PROZESS_KAFKA_SASL_PASSWORD)")
}

// conn is how clients reach brokers with these settings.
func (k KafkaSecurity) conn(brokers []string) (saga.Conn, error) {
	c := saga.Conn{Brokers: brokers}
	var err error
	if c.TLS, err = k.TLS.config("kafka"); err != nil {
		return saga.Conn{}, err
	}
	if k.SASLMechanism == "" {
		if k.SASLUser != "" || k.SASLPasswordFile != "" {
			return saga.Conn{}, fmt.Errorf("--kafka-sasl-username/--kafka-sasl-password-file need --kafka-sasl-mechanism")
		}
		return c, nil
	}
	if k.SASLUser == "" {
		return saga.Conn{}, fmt.Errorf("--kafka-sasl-mechanism %s needs --kafka-sasl-username", k.SASLMechanism)
	}
	pass, err := secret(k.SASLPasswordFile, "kafka-sasl-password-file", "PROZESS_KAFKA_SASL_PASSWORD")
	if err != nil {
		return saga.Conn{}, err
	}
	var m sasl.Mechanism
	switch strings.ToUpper(k.SASLMechanism) {
	case "PLAIN":
		// PLAIN sends the password itself: over a plain connection anyone
		// on the path reads it.
		if c.TLS == nil {
			return saga.Conn{}, fmt.Errorf("--kafka-sasl-mechanism PLAIN without TLS would send the password in clear: add --kafka-tls, or use SCRAM-SHA-512")
		}
		m = plain.Auth{User: k.SASLUser, Pass: pass}.AsMechanism()
	case "SCRAM-SHA-256":
		m = scram.Auth{User: k.SASLUser, Pass: pass}.AsSha256Mechanism()
	case "SCRAM-SHA-512":
		m = scram.Auth{User: k.SASLUser, Pass: pass}.AsSha512Mechanism()
	default:
		return saga.Conn{}, fmt.Errorf("--kafka-sasl-mechanism %q: want PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", k.SASLMechanism)
	}
	c.SASL = m
	return c, nil
}

// RedisAuth is how prozess authenticates to Redis: an ACL user (or the
// default user) with a password, over TLS when set.
type RedisAuth struct {
	Username string
	Password string
	TLS      *tls.Config
}

// RedisSecurity is the flags behind RedisAuth.
type RedisSecurity struct {
	Username     string
	PasswordFile string // else PROZESS_REDIS_PASSWORD
	TLS          TLSFiles
}

func (r *RedisSecurity) flags(fs *pflag.FlagSet) {
	fs.StringVar(&r.Username, "redis-username", r.Username, "Redis ACL user (empty: the default user)")
	fs.StringVar(&r.PasswordFile, "redis-password-file", r.PasswordFile,
		"file holding the Redis password (else the environment variable PROZESS_REDIS_PASSWORD; neither: no AUTH)")
	r.TLS.flags(fs, "redis", "Redis")
}

func (r RedisSecurity) auth() (RedisAuth, error) {
	pass, err := secret(r.PasswordFile, "redis-password-file", "PROZESS_REDIS_PASSWORD")
	if err != nil {
		return RedisAuth{}, err
	}
	tc, err := r.TLS.config("redis")
	if err != nil {
		return RedisAuth{}, err
	}
	return RedisAuth{Username: r.Username, Password: pass, TLS: tc}, nil
}

// secret reads a password from file (flag names it in errors), else from
// the environment variable env; both empty is no password. The file's
// content never appears in an error.
func secret(file, flag, env string) (string, error) {
	if file == "" {
		return os.Getenv(env), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--%s: %w", flag, err)
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// redact replaces every occurrence of secret in s, for errors that might
// quote what was sent.
func redact(s, secret string) string {
	if secret == "" {
		return s
	}
	return strings.ReplaceAll(s, secret, "[redacted]")
}
