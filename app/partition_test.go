package app_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	neturl "net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// cutter is toxiproxy (github.com/Shopify/toxiproxy/v2), in process, in
// front of some addresses: a proxy each on a free port, cut and healed
// together. A cut is toxiproxy's timeout toxic with timeout 0 in both
// directions, a blackhole: connections stay open, and nothing gets
// through either way (not even a close) until heal removes it. Healing
// closes the connections that were held, whose bytes were dropped: neither
// end could go on with them, as after a long partition.
type cutter struct {
	t       *testing.T
	proxies map[string]*toxiproxy.Proxy // by the address each stands in front of
}

func newCutter(t *testing.T, upstreams ...string) *cutter {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	c := &cutter{t: t, proxies: map[string]*toxiproxy.Proxy{}}
	for _, up := range upstreams {
		if c.proxies[up] != nil {
			continue
		}
		p := toxiproxy.NewProxy(srv, up, "127.0.0.1:0", up)
		if err := srv.Collection.Add(p, true); err != nil {
			t.Fatalf("toxiproxy in front of %s: %v", up, err)
		}
		c.proxies[up] = p
	}
	t.Cleanup(func() {
		if err := srv.Collection.Clear(); err != nil {
			t.Errorf("stopping toxiproxy: %v", err)
		}
	})
	return c
}

// addr is where to connect to reach upstream through its proxy.
func (c *cutter) addr(upstream string) string { return c.proxies[upstream].Listen }

// dial is a Kafka client's dialer (app.Config.KafkaDial) that reaches
// every broker through its proxy; an address without one is refused, so
// no connection goes around the cut.
func (c *cutter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	p := c.proxies[addr]
	if p == nil {
		return nil, fmt.Errorf("no toxiproxy in front of %s (only %v)", addr, slices.Sorted(maps.Keys(c.proxies)))
	}
	var d net.Dialer
	return d.DialContext(ctx, network, p.Listen)
}

var cutDirections = []string{"upstream", "downstream"}

// cut starts dropping everything, both ways.
func (c *cutter) cut() {
	c.t.Helper()
	for up, p := range c.proxies {
		for _, dir := range cutDirections {
			toxic := fmt.Sprintf(`{"name": "cut-%[1]s", "type": "timeout", "stream": "%[1]s", "attributes": {"timeout": 0}}`, dir)
			if _, err := p.Toxics.AddToxicJson(strings.NewReader(toxic)); err != nil {
				c.t.Fatalf("cutting %s %s: %v", up, dir, err)
			}
		}
	}
}

// heal lets everything through again; healing a whole network does nothing.
func (c *cutter) heal() {
	c.t.Helper()
	for up, p := range c.proxies {
		for _, dir := range cutDirections {
			if err := p.Toxics.RemoveToxic(context.Background(), "cut-"+dir); err != nil && !errors.Is(err, toxiproxy.ErrToxicNotFound) {
				c.t.Errorf("healing %s %s: %v", up, dir, err)
			}
		}
	}
}

// groupMembers counts the members of a stable group (-1 while it is not).
func groupMembers(t *testing.T, adm *kadm.Client, group string) int {
	t.Helper()
	gs, err := adm.DescribeGroups(t.Context(), group)
	if err != nil {
		return -1
	}
	g := gs[group]
	if g.State != "Stable" {
		return -1
	}
	return len(g.Members)
}

// awaitMembers waits until group is stable with n members and returns how
// long that took.
func awaitMembers(t *testing.T, adm *kadm.Client, group string, n int, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for groupMembers(t, adm, group) != n {
		if time.Since(start) > within {
			t.Fatalf("group %s not stable with %d members within %s", group, n, within)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Since(start)
}

// ordersDuringCut places n orders through r, one every gap, and times each
// until it is SHIPPED or CANCELLED in PostgreSQL, for up to 30 s after the
// last is placed. It returns them in the order placed, how many finished
// within 30 s of being placed, and the slowest of those.
func ordersDuringCut(t *testing.T, e *env, r *running, n int, gap time.Duration) (ids []uuid.UUID, within int, slowest time.Duration) {
	t.Helper()
	placed := map[uuid.UUID]time.Time{}
	finished := map[uuid.UUID]time.Duration{}
	poll := func() {
		var open []uuid.UUID
		for _, id := range ids {
			if _, ok := finished[id]; !ok {
				open = append(open, id)
			}
		}
		rows, err := e.pool.Query(t.Context(), `SELECT id FROM orders WHERE id = ANY($1) AND status IN ('SHIPPED', 'CANCELLED')`, open)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var id uuid.UUID
			if err := rows.Scan(&id); err != nil {
				t.Fatal(err)
			}
			finished[id] = time.Since(placed[id])
		}
	}
	for range n {
		id := r.order(t, "u1", "", mouse(1)).OrderID
		placed[id] = time.Now()
		ids = append(ids, id)
		poll()
		time.Sleep(gap)
	}
	for time.Since(placed[ids[len(ids)-1]]) < 30*time.Second && len(finished) < len(ids) {
		poll()
		time.Sleep(100 * time.Millisecond)
	}
	for _, id := range ids {
		if d, ok := finished[id]; ok && d <= 30*time.Second {
			within++
			slowest = max(slowest, d)
		}
	}
	return ids, within, slowest
}

// shipOneByOne places n orders through r, one after another, each once
// the one before has ended, and returns them: the system works before the
// fault.
func shipOneByOne(t *testing.T, r *running, n int) []uuid.UUID {
	t.Helper()
	var ids []uuid.UUID
	for range n {
		id := r.order(t, "u1", "", mouse(1)).OrderID
		ids = append(ids, id)
		r.await(t, id.String(), 60*time.Second)
	}
	return ids
}

// settlesAfterCut checks what a healed cut left, by the client's own
// record (accepted, every order the test placed) and by prozess check:
// every accepted order finishes (none lost), PostgreSQL has no order but
// these, 12 orders placed after the heal finish too, and check finds
// nothing doubled or stuck. rejoined is the healed instance's participant:
// it must have applied some of the new orders' events, as a member again.
func settlesAfterCut(t *testing.T, e *env, r *running, accepted []uuid.UUID, healedAt time.Time, rejoined *saga.ConsumerStats) {
	t.Helper()
	for _, id := range accepted {
		r.await(t, id.String(), 60*time.Second)
	}
	applied := rejoined.Applied.Load()
	var after []uuid.UUID
	for range 12 {
		after = append(after, r.order(t, "u1", "", mouse(1)).OrderID)
	}
	for _, id := range after {
		r.await(t, id.String(), 60*time.Second)
	}
	accepted = append(accepted, after...)
	since := rejoined.Applied.Load() - applied
	t.Logf("all %d accepted orders settled %s after healing; the rejoined instance applied %d events since",
		len(accepted), time.Since(healedAt).Round(10*time.Millisecond), since)
	if since == 0 {
		t.Error("the healed instance applied none of the 12 orders' events placed after it rejoined")
	}
	if n := e.count(`SELECT count(*) FROM orders`); n != int64(len(accepted)) {
		t.Errorf("%d orders in PostgreSQL, %d accepted", n, len(accepted))
	}
	rdb, _ := schematest.NewRedis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := check.Run(ctx, e.pool, check.Config{Deadline: 30 * time.Second, Redis: rdb, Prefix: e.prefix})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Violations) > 0 {
		t.Errorf("prozess check after the cut:\n%s", rep.Text())
	}
}

// With two inventory instances, one cut off from PostgreSQL (a blackhole:
// its connections stay open, nothing answers; it still heartbeats to the
// broker) for longer than the session and the statement timeout, at least
// 9 in 10 orders placed meanwhile finish within 30 s: the cut-off instance
// gives its partitions up after --give-up-after and the healthy one takes
// them over. Once healed it rejoins, everything finishes, and prozess
// check finds nothing lost or doubled. Before, it kept its partitions for
// as long as the cut lasted.
func TestInventoryCutOffFromPostgresGivesItsPartitionsUp(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	cfg.Partitions = 6
	main := e.start(cfg, "api", "payment", "delivery", "status")
	e.start(cfg, "inventory")
	dbURL, err := neturl.Parse(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newCutter(t, dbURL.Host)
	dbURL.Host = proxy.addr(dbURL.Host)
	cut := cfg
	cut.DatabaseURL = dbURL.String()
	cutOff := e.start(cut, "inventory")
	t.Cleanup(proxy.heal) // before cutOff stops, should the test end cut

	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.KafkaBrokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	group := cfg.GroupPrefix + "inventory"
	awaitMembers(t, adm, group, 2, 60*time.Second)
	accepted := shipOneByOne(t, main, 4)

	// Cut it off; place 30 orders, one every 300ms, and time each.
	const outage = 45 * time.Second // > session timeout (10s), statement timeout (30s)
	proxy.cut()
	cutAt := time.Now()
	during, within, slowest := ordersDuringCut(t, e, main, 30, 300*time.Millisecond)
	accepted = append(accepted, during...)
	gaveUp := cutOff.sys.Stats()["inventory"].GaveUp.Load()
	t.Logf("cut off from PostgreSQL: %d of %d orders placed meanwhile finished within 30s (slowest of those %s); gave up %d time(s)",
		within, len(during), slowest.Round(10*time.Millisecond), gaveUp)
	if within < 27 {
		t.Errorf("only %d of %d orders placed while an inventory was cut off finished within 30s; want 27", within, len(during))
	}
	if gaveUp == 0 {
		t.Error("the cut-off inventory never gave its partitions up")
	}
	time.Sleep(time.Until(cutAt.Add(outage)))
	proxy.heal()
	healedAt := time.Now()
	t.Logf("healed after %s; rejoined the group %s later", time.Since(cutAt).Round(time.Second), awaitMembers(t, adm, group, 2, 60*time.Second).Round(10*time.Millisecond))
	settlesAfterCut(t, e, main, accepted, healedAt, cutOff.sys.Stats()["inventory"])
}

// With two payment instances, one cut off from the broker (a blackhole
// between it and the broker: its connections stay open, nothing answers,
// nothing is reset; it still reaches PostgreSQL) for longer than the
// session timeout: the broker ends the silent member's session, so the
// healthy instance owns every partition within about the session timeout
// and at least 9 in 10 orders placed meanwhile finish within 30 s, instead
// of the cut-off instance's share waiting for the network to heal. Once
// healed it rejoins, and nothing is lost, doubled or stuck.
//
// A broker advertises its own address, so a proxy only at bootstrap would
// be gone around: the cut-off instance's Kafka clients dial every broker
// address through toxiproxy (app.Config.KafkaDial), the rest directly.
func TestPaymentCutOffFromTheBrokerGivesItsPartitionsUp(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	cfg.Partitions = 6
	main := e.start(cfg, "api", "inventory", "delivery", "status")
	// main's relay publishes the outbox, so the cut stops only payment.
	for deadline := time.Now().Add(30 * time.Second); value(scrape(t, "http://"+main.sys.AdminAddr()+"/metrics"), "prozess_relay_leader ") != 1; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first system's relay did not take the outbox lock within 30s")
		}
	}
	e.start(cfg, "payment")

	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.KafkaBrokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	brokers, err := adm.ListBrokers(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	upstreams := slices.Clone(cfg.KafkaBrokers) // bootstrap, then what each broker advertises
	for _, b := range brokers {
		upstreams = append(upstreams, net.JoinHostPort(b.Host, strconv.Itoa(int(b.Port))))
	}
	proxy := newCutter(t, upstreams...)
	cut := cfg
	cut.KafkaDial = proxy.dial
	cutOff := e.start(cut, "payment")
	t.Cleanup(proxy.heal) // before cutOff stops, should the test end cut

	group := cfg.GroupPrefix + "payment"
	awaitMembers(t, adm, group, 2, 60*time.Second)
	accepted := shipOneByOne(t, main, 4)

	// Cut it off; time how long until the group is the healthy instance
	// alone, while 30 orders are placed, one every 300ms.
	const outage = 45 * time.Second // > session timeout (10s) + 30s of orders
	proxy.cut()
	cutAt := time.Now()
	alone := make(chan time.Duration, 1)
	go func() {
		for groupMembers(t, adm, group) != 1 && time.Since(cutAt) < outage && t.Context().Err() == nil {
			time.Sleep(100 * time.Millisecond)
		}
		alone <- time.Since(cutAt)
	}()
	during, within, slowest := ordersDuringCut(t, e, main, 30, 300*time.Millisecond)
	accepted = append(accepted, during...)
	gaveUpIn := <-alone
	t.Logf("cut off from the broker: the group was the healthy payment alone %s after the cut (session timeout %s); %d of %d orders placed meanwhile finished within 30s (slowest of those %s)",
		gaveUpIn.Round(10*time.Millisecond), cfg.SessionTimeout, within, len(during), slowest.Round(10*time.Millisecond))
	if within < 27 {
		t.Errorf("only %d of %d orders placed while a payment was cut off from the broker finished within 30s; want 27", within, len(during))
	}
	if gaveUpIn > cfg.SessionTimeout+5*time.Second {
		t.Errorf("the cut-off payment's partitions moved %s after the cut; want within about the session timeout (%s)", gaveUpIn, cfg.SessionTimeout)
	}
	time.Sleep(time.Until(cutAt.Add(outage)))
	proxy.heal()
	healedAt := time.Now()
	t.Logf("healed after %s; rejoined the group %s later", time.Since(cutAt).Round(time.Second), awaitMembers(t, adm, group, 2, 60*time.Second).Round(10*time.Millisecond))
	settlesAfterCut(t, e, main, accepted, healedAt, cutOff.sys.Stats()["payment"])
}

// blocker is a participant that, once, stops inside its batch transaction
// (after its inbox claim and its effect) until released.
type blocker struct {
	once    sync.Once
	inTx    chan struct{}
	release chan struct{}
}

func (*blocker) Handles(event.Type) bool { return true }

func (b *blocker) Handle(ctx context.Context, tx pgx.Tx, evs []event.Event) ([]event.Event, error) {
	b.once.Do(func() {
		close(b.inTx)
		<-b.release
	})
	return nil, nil
}

// A participant cut off from PostgreSQL in the middle of a batch does not
// keep that transaction's locks for as long as the cut lasts: PostgreSQL
// ends the transaction once it has been idle 5s, so another instance
// claiming the same event (here a plain insert of its inbox row) waits
// seconds, not until the network heals. Before, the claim waited for the
// whole cut.
func TestCutOffMidBatchReleasesItsLocks(t *testing.T) {
	t.Parallel()
	url := schematest.NewDatabase(t)
	pool, err := pgxpool.New(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	k := sagatest.New(t)
	spec := saga.Topics{Topic: k.Topic, DLQ: k.Topic + ".dlq", Partitions: 1}
	if err := saga.EnsureTopics(t.Context(), saga.Conn{Brokers: k.Brokers}, spec, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	dbURL, err := neturl.Parse(url)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newCutter(t, dbURL.Host)
	dbURL.Host = proxy.addr(dbURL.Host)
	cutPool, err := pgxpool.New(t.Context(), dbURL.String())
	if err != nil {
		t.Fatal(err)
	}
	h := &blocker{inTx: make(chan struct{}), release: make(chan struct{})}
	c, err := saga.NewConsumer("cutoff", slog.New(slog.DiscardHandler), cutPool, h, saga.ConsumerConfig{
		Kafka: saga.Conn{Brokers: k.Brokers}, Topic: k.Topic, DLQTopic: spec.DLQ, Group: k.GroupPrefix + "cutoff", GiveUpAfter: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		proxy.heal()
		cancel()
		<-done
		c.Close()
		cutPool.Close()
	})

	ev, err := event.New(event.OrderCreated, uuid.New(), "test", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), ev.Record(k.Topic)).FirstErr(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.inTx:
	case <-time.After(60 * time.Second):
		t.Fatal("the batch never started")
	}
	proxy.cut()
	close(h.release) // the consumer goes on: its next statement meets the blackhole
	start := time.Now()
	claimCtx, claimCancel := context.WithTimeout(t.Context(), 25*time.Second)
	defer claimCancel()
	tag, err := pool.Exec(claimCtx, `INSERT INTO inbox (consumer, event_id) VALUES ('cutoff', $1) ON CONFLICT DO NOTHING`, ev.ID)
	took := time.Since(start)
	t.Logf("the claim waited %s for the cut-off transaction", took.Round(10*time.Millisecond))
	if err != nil {
		t.Fatalf("claiming the event the cut-off instance held: %v after %s", err, took)
	}
	if tag.RowsAffected() != 1 {
		t.Fatalf("the cut-off instance's claim was committed")
	}
	if took > 12*time.Second {
		t.Fatalf("the claim waited %s for the cut-off transaction; want PostgreSQL to end it after 5s idle", took)
	}
}
