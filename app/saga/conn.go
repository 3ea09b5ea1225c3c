package saga

import (
	"context"
	"crypto/tls"
	"net"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl"
)

// Conn is how every Kafka client prozess creates reaches the cluster: the
// seed brokers and, for a secured cluster, TLS and a SASL mechanism
// (franz-go's own sasl/plain and sasl/scram). Participants, the relay,
// the admin checks, tails, `dlq`, `check` and loadgen all dial through it,
// so a cluster that needs SASL_SSL needs it said once.
type Conn struct {
	Brokers []string
	TLS     *tls.Config    // nil: plaintext
	SASL    sasl.Mechanism // nil: no authentication
	// Dial, when set, opens every connection to a broker (the addresses
	// the brokers advertise as well as Brokers): a route of one process's
	// own, such as the fault proxy a test puts between one instance and
	// the cluster. Plaintext only: franz-go refuses it together with TLS.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Opts are the client options that connect to the cluster, then extra.
func (c Conn) Opts(extra ...kgo.Opt) []kgo.Opt {
	opts := []kgo.Opt{kgo.SeedBrokers(c.Brokers...)}
	if c.TLS != nil {
		opts = append(opts, kgo.DialTLSConfig(c.TLS.Clone()))
	}
	if c.Dial != nil {
		opts = append(opts, kgo.Dialer(c.Dial))
	}
	if c.SASL != nil {
		opts = append(opts, kgo.SASL(c.SASL))
	}
	return append(opts, extra...)
}

// Client creates a client connected through c with extra options.
func (c Conn) Client(extra ...kgo.Opt) (*kgo.Client, error) {
	return kgo.NewClient(c.Opts(extra...)...)
}
