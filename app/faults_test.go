package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/app/loadgen"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/schema/schematest"
)

var (
	faultsDuration = flag.Duration("faults.duration", 0, "run the fault suite's cycle of faults for this long (the long version); 0 runs each fault once")
	faultsReport   = flag.String("faults.report", "", "write the fault suite's table (Markdown) to this file")
	faultsRun      = flag.String("faults.run", "", "run only the faults whose names match this regular expression (to reproduce one)")
)

// servicesFaults is set where restarting the machine's PostgreSQL and Redis
// is allowed: they are shared with every other test, so .ci/run runs those
// faults in a step of their own.
func servicesFaults() bool { return os.Getenv("PROZESS_FAULT_SERVICES") == "1" }

// deployment is every participant in its own process on `prozess broker`,
// as in production.
type deployment struct {
	t         *testing.T
	e         *env
	env       []string
	brokerDir string
	brokerArg string
	broker    *proc
	procs     map[string]*proc
	url       string
	admin     string // the api process's /metrics, /livez, /readyz
}

func newDeployment(t *testing.T, e *env) *deployment {
	d := &deployment{t: t, e: e, brokerDir: t.TempDir(), procs: map[string]*proc{}}
	if e.kafka != nil {
		d.brokerArg = strings.Join(e.kafka.Brokers, ",")
	} else {
		d.startBroker("127.0.0.1:0")
	}
	cfg := e.config()
	d.env = []string{
		"PROZESS_DATABASE_URL=" + e.dbURL, "PROZESS_REDIS_ADDR=" + schematest.RedisAddr(t), "PROZESS_REDIS_PREFIX=" + e.prefix,
		"PROZESS_KAFKA_BROKERS=" + d.brokerArg, "PROZESS_LOG_FORMAT=json", "PROZESS_RATE_LIMIT=0", "PROZESS_ADMIN_ADDR=127.0.0.1:0", "PROZESS_LOG_LEVEL=warn", "PROZESS_PAYMENT_DECLINE_RATE=0.2",
		"PROZESS_TOPIC=" + cfg.Topic, "PROZESS_GROUP_PREFIX=" + cfg.GroupPrefix,
	}
	for _, p := range []string{"api", "inventory", "payment", "delivery", "status"} {
		d.start(p)
	}
	return d
}

func (d *deployment) startBroker(addr string) {
	d.broker = spawn(d.t, nil, "broker", "--addr", addr, "--data-dir", d.brokerDir, "--log-format", "json")
	d.brokerArg = d.broker.await(d.t, "broker address", func(m map[string]any) bool { return m["stdout"] == true })["line"].(string)
}

// start runs one participant in a process of its own and waits until it is ready.
func (d *deployment) start(name string, extra ...string) *proc {
	return d.startAs(name, name, extra...)
}

// startAs is start for a process known as key (a second instance of a
// participant has a key of its own).
func (d *deployment) startAs(key, name string, extra ...string) *proc {
	args := append([]string{"serve", name, "--log-level", "info", "--kafka-log-level", "info"}, extra...)
	first := name == "api" && d.url == ""
	if name == "api" {
		// A restarted api takes the same addresses, so the load (which
		// reads d.url concurrently) never needs a new one.
		httpAddr, adminAddr := "127.0.0.1:0", "127.0.0.1:0"
		if !first {
			httpAddr, adminAddr = strings.TrimPrefix(d.url, "http://"), strings.TrimPrefix(d.admin, "http://")
		}
		args = append(args, "--http-addr", httpAddr, "--admin-addr", adminAddr)
	}
	p := spawn(d.t, d.env, args...)
	d.procs[key] = p
	if len(extra) == 0 {
		ready := p.ready(d.t)
		if first {
			d.url = "http://" + ready["http"].(string)
			d.admin = "http://" + ready["admin"].(string)
		}
	}
	return p
}

// dump logs what a failed fault test needs to be understood.
func (d *deployment) dump() {
	rows, err := d.e.pool.Query(context.Background(), `SELECT status, count(*) FROM orders GROUP BY status`)
	if err == nil {
		for rows.Next() {
			var s string
			var n int64
			rows.Scan(&s, &n)
			d.t.Logf("orders %s: %d", s, n)
		}
		rows.Close()
	}
	for name, p := range d.procs {
		d.t.Logf("last lines of %s:\n%s", name, p.tail())
	}
}

// awaitReady polls the api process's /readyz until it says ready (or not,
// with a reason mentioning why).
func (d *deployment) awaitReady(ready bool, why string) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(d.admin + "/readyz")
		if err == nil {
			var body struct{ Status, Reason string }
			_ = json.NewDecoder(resp.Body).Decode(&body)
			resp.Body.Close()
			if (resp.StatusCode == http.StatusOK) == ready && strings.Contains(body.Reason, why) {
				return
			}
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("/readyz did not become ready=%v (%s) within 20s", ready, why)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// mustRead reads one order through the api, as its owner.
func (d *deployment) mustRead(id string) {
	req, _ := http.NewRequest(http.MethodGet, d.url+"/orders/"+id, nil)
	req.Header.Set("Authorization", "Bearer "+d.e.keyFor("faults"))
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		d.t.Fatalf("reading an order during the fault: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Prozess-Source") != "database" {
		d.t.Fatalf("reading an order during the fault: %d from %q, want 200 from the database", resp.StatusCode, resp.Header.Get("X-Prozess-Source"))
	}
}

// kill SIGKILLs the process known as name and checks that it was running
// until then and died of that signal: one that had died by itself would
// otherwise be restarted silently.
func (d *deployment) kill(name string) {
	d.t.Helper()
	d.killProc(name, d.procs[name])
}

func (d *deployment) killProc(name string, p *proc) {
	d.t.Helper()
	d.assertRunning(name, p)
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		d.t.Fatalf("SIGKILL %s: %v; its last lines:\n%s", name, err, p.tail())
	}
	p.wait(d.t)
	if ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		d.t.Fatalf("%s ended %v, not by the SIGKILL sent; its last lines:\n%s", name, p.cmd.ProcessState, p.tail())
	}
}

// signal sends sig to the process known as name, which must be running.
func (d *deployment) signal(name string, sig syscall.Signal) {
	d.t.Helper()
	p := d.procs[name]
	d.assertRunning(name, p)
	if err := p.cmd.Process.Signal(sig); err != nil {
		d.t.Fatalf("%v to %s: %v", sig, name, err)
	}
}

// assertRunning fails the test if p has exited: every process of the
// deployment runs until the test stops it.
func (d *deployment) assertRunning(name string, p *proc) {
	d.t.Helper()
	select {
	case err := <-p.exit:
		p.exit <- err
		d.t.Fatalf("%s exited by itself (%v); its last lines:\n%s", name, err, p.tail())
	default:
	}
}

// assertAllRunning is assertRunning for every process of the deployment.
func (d *deployment) assertAllRunning() {
	d.t.Helper()
	if d.broker != nil {
		d.assertRunning("broker", d.broker)
	}
	for name, p := range d.procs {
		d.assertRunning(name, p)
	}
}

// stopParticipants stops every participant's process with SIGTERM and
// checks each exits 0 (each commits what it applied on the way out).
func (d *deployment) stopParticipants() {
	d.t.Helper()
	for _, name := range slices.Sorted(maps.Keys(d.procs)) {
		d.assertRunning(name, d.procs[name])
		d.procs[name].stop(d.t)
	}
}

// awaitLockWaiters waits until the number of sessions of the test's
// database waiting on a lock in a statement containing query satisfies ok.
func (d *deployment) awaitLockWaiters(query string, ok func(n int64) bool, what string) {
	d.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		n := d.e.count(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
			AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'`, query)
		if ok(n) {
			return
		}
		if time.Now().After(deadline) {
			d.dump()
			d.t.Fatalf("%s: still %d sessions waiting in %q after 30s", what, n, query)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// awaitZombieReplaced waits until the frozen payment instance's partitions
// have moved: the live instance waits in its inbox claim on the zombie's
// uncommitted rows, or the group has only the live member left.
func (d *deployment) awaitZombieReplaced(frozen time.Time) {
	d.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(strings.Split(d.brokerArg, ",")...))
	if err != nil {
		d.t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	group := d.e.config().GroupPrefix + "payment"
	deadline := time.Now().Add(60 * time.Second)
	for {
		waiting := d.e.count(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
			AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO inbox%'`)
		if waiting > 0 || groupMembers(d.t, adm, group) == 1 {
			d.t.Logf("payment's partitions reached the other instance %.1fs after it froze (live instance waiting on the zombie's rows: %v)",
				time.Since(frozen).Seconds(), waiting > 0)
			return
		}
		if time.Now().After(deadline) {
			d.dump()
			d.t.Fatalf("the frozen payment instance's partitions did not move within 60s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// zombiePayment freezes one of the two payment instances in the middle of
// a batch, inside its database transaction, for longer than its session
// timeout, so that its partitions move to the other instance; then wakes
// it, so it finishes a batch whose partitions it no longer owns, and
// redeploys it (SIGTERM, exit 0, start). The other instance must skip that
// batch's events, nothing may be charged twice, and no group's committed
// offsets may go backwards (watchOffsets).
func (d *deployment) zombiePayment() {
	t := d.t
	ctx := t.Context()
	// Hold every payment batch in its transaction: both instances block in
	// their INSERT INTO payments, their inbox rows claimed.
	tx, err := d.e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // after Commit it is a no-op
	if _, err := tx.Exec(ctx, `LOCK TABLE payments IN EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	d.awaitLockWaiters("INSERT INTO payments", func(n int64) bool { return n >= 2 }, "both payment instances blocked mid-batch")
	d.signal("payment", syscall.SIGSTOP)
	frozen := time.Now()
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// The frozen instance's INSERT completes on the server and its
	// transaction stays open, until PostgreSQL ends it (a batch transaction
	// left idle 5 s is ended: the zombie then holds no rows). Once its
	// session times out the live instance takes its partitions and polls
	// the same records (waiting in its inbox claim on the zombie's rows if
	// they are still held): the zombie is now mid-batch with revoked
	// partitions.
	d.awaitZombieReplaced(frozen)
	d.signal("payment", syscall.SIGCONT)
	// Woken, it commits that batch (the live one, unblocked, skips its
	// events) and tries its offsets. It is stopped right then, as an
	// orchestrator that gave up on it would: what it still holds as applied
	// belongs to partitions it no longer owns, and must not be committed
	// over the live one's progress.
	d.awaitLockWaiters("INSERT INTO inbox", func(n int64) bool { return n == 0 }, "the woken payment instance ending its batch")
	zombie := d.procs["payment"]
	zombie.stop(t)
	for _, line := range strings.Split(zombie.tail(), "\n") {
		if strings.Contains(line, "offset") || strings.Contains(line, "revok") || strings.Contains(line, "lost") {
			t.Logf("woken payment: %s", line)
		}
	}
	d.start("payment")
}

// offsetWatch reads every participant group's committed offsets on the
// saga topic while the suite runs and remembers any that went backwards: a
// commit of a partition the committer no longer owns (a zombie's, or one
// at shutdown) would rewind its new owner.
type offsetWatch struct {
	adm       *kadm.Client
	close     func()
	groups    []string
	topic     string
	stop      chan struct{}
	done      chan struct{}
	seen      map[string]int64 // "group topic/partition" -> the committed offset read last
	backwards []string
	mu        sync.Mutex
	phase     string // what the suite is doing, for the report of a rewind
}

// during names what the suite does from now on, for the report of a rewind.
func (w *offsetWatch) during(phase string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.phase = phase
}

func (d *deployment) watchOffsets() *offsetWatch {
	cfg := d.e.config()
	var groups []string
	for _, p := range []string{"inventory", "payment", "delivery", "status"} {
		groups = append(groups, cfg.GroupPrefix+p)
	}
	return newOffsetWatch(d.t, strings.Split(d.brokerArg, ","), cfg.Topic, groups)
}

// newOffsetWatch watches the groups' committed offsets on topic every 50
// ms until halt.
func newOffsetWatch(t *testing.T, brokers []string, topic string, groups []string) *offsetWatch {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	w := &offsetWatch{adm: kadm.NewClient(cl), close: cl.Close, topic: topic, groups: groups, stop: make(chan struct{}),
		done: make(chan struct{}), seen: map[string]int64{}}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-tick.C:
				w.read()
			}
		}
	}()
	return w
}

// read fetches the committed offsets once; a group or broker that cannot
// answer now (restarting) is read next time.
func (w *offsetWatch) read() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, r := range w.adm.FetchManyOffsets(ctx, w.groups...) {
		if r.Err != nil {
			continue
		}
		r.Fetched.Each(func(o kadm.OffsetResponse) {
			if o.Err != nil || o.Topic != w.topic || o.At < 0 {
				return
			}
			k := fmt.Sprintf("%s %s/%d", r.Group, o.Topic, o.Partition)
			// A rewind is reported once, and the watch goes on from it.
			if prev, ok := w.seen[k]; ok && o.At < prev {
				w.mu.Lock()
				phase := w.phase
				w.mu.Unlock()
				w.backwards = append(w.backwards, fmt.Sprintf("%s: %d after %d (seen at %s, during: %s)", k, o.At, prev,
					time.Now().UTC().Format("15:04:05.000"), phase))
			}
			w.seen[k] = o.At
		})
	}
}

// lag says, per group and partition, how far the committed offset is behind
// the log's end: where orders are stuck, it names the participant and the
// partitions that stopped.
func (w *offsetWatch) lag() string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lags, err := w.adm.Lag(ctx, w.groups...)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, g := range w.groups {
		l := lags[g]
		if l.Error() != nil {
			fmt.Fprintf(&b, "%s: %v\n", g, l.Error())
			continue
		}
		fmt.Fprintf(&b, "%s (%s):", g, l.State)
		for _, p := range l.Lag.Sorted() {
			if p.Topic != w.topic {
				continue
			}
			member := "nobody"
			if !p.IsEmpty() {
				member = p.Member.ClientID
			}
			fmt.Fprintf(&b, " %d:%d@%s", p.Partition, p.Lag, member)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// halt stops the watch, reads the offsets a last time and returns every
// rewind seen.
func (w *offsetWatch) halt() []string {
	close(w.stop)
	<-w.done
	w.read()
	w.close()
	return w.backwards
}

// load posts orders at a steady rate until stopped and remembers, as the
// client saw it, every order accepted (a 201 with its id) and every one it
// gave up on.
type load struct {
	mu       sync.Mutex
	accepted []string
	refused  []refusal // given up after 30 tries
	odd      []string  // answers a careful client must never get (a 4xx, a 201 without an order id, another 2xx)
	retries  int       // failed attempts that were retried
	stop     chan struct{}
	done     sync.WaitGroup
}

// refusal is an order the client gave up on: its Idempotency-Key and why
// its last attempt failed (a connection error or a 5xx, nothing else).
type refusal struct{ key, last string }

func (d *deployment) startLoad(rate int) *load {
	l := &load{stop: make(chan struct{})}
	client := &http.Client{Timeout: 5 * time.Second}
	if err := loadgen.EnsureProduct(d.t.Context(), d.e.dbURL, "prod-load"); err != nil {
		d.t.Fatal(err)
	}
	apiKey := d.e.keyFor("faults")
	body, _ := json.Marshal(map[string]any{"user_id": "faults", "items": []map[string]any{{"product_id": "prod-load", "qty": 1}}})
	l.done.Add(1)
	go func() {
		defer l.done.Done()
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for {
			select {
			case <-l.stop:
				return
			case <-tick.C:
			}
			l.done.Add(1)
			key := uuid.NewString()
			go func() {
				defer l.done.Done()
				// Like a careful client: every order has an Idempotency-Key and
				// a failed POST (no answer, or a 5xx) is retried with it, so an
				// ambiguous commit (committed, but the caller saw an error) is
				// answered with the same order, never a second one.
				var last string
				for attempt := 0; attempt < 30; attempt++ {
					if attempt > 0 {
						time.Sleep(time.Second)
					}
					req, _ := http.NewRequest(http.MethodPost, d.url+"/orders", bytes.NewReader(body))
					req.Header.Set("Idempotency-Key", key)
					req.Header.Set("Authorization", "Bearer "+apiKey)
					resp, err := client.Do(req)
					if err != nil {
						last = err.Error()
						l.mu.Lock()
						l.retries++
						l.mu.Unlock()
						continue
					}
					var out struct {
						OrderID string `json:"order_id"`
					}
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					l.mu.Lock()
					switch {
					case resp.StatusCode == http.StatusCreated && json.Unmarshal(b, &out) == nil && out.OrderID != "":
						l.accepted = append(l.accepted, out.OrderID)
						l.mu.Unlock()
						return
					case resp.StatusCode >= 500:
						last = fmt.Sprintf("%d %s", resp.StatusCode, bytes.TrimSpace(b))
						l.retries++
						l.mu.Unlock()
					default:
						l.odd = append(l.odd, fmt.Sprintf("key %s: %d %s", key, resp.StatusCode, bytes.TrimSpace(b)))
						l.mu.Unlock()
						return
					}
				}
				l.mu.Lock()
				l.refused = append(l.refused, refusal{key: key, last: last})
				l.mu.Unlock()
			}()
		}
	}()
	return l
}

func (l *load) halt() { close(l.stop); l.done.Wait() }

func (l *load) snapshot() ([]string, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.accepted...), len(l.refused)
}

// row is one line of the fault table.
type row struct {
	fault                                    string
	injected, accepted, lost, doubled, stuck int
	recovery                                 time.Duration
}

// settle waits until every accepted order is terminal (at most 30s after
// the heal), then checks every invariant. It returns what it found.
func (d *deployment) settle(accepted []string) (lost, doubled, stuck int, took time.Duration) {
	t := d.t
	start := time.Now()
	for {
		var pending int64
		if err := d.e.pool.QueryRow(t.Context(), `
			SELECT count(*) FROM unnest($1::uuid[]) a(id) LEFT JOIN orders o ON o.id = a.id
			WHERE o.id IS NULL OR o.status NOT IN ('SHIPPED', 'CANCELLED')`, accepted).Scan(&pending); err != nil {
			t.Fatal(err)
		}
		if pending == 0 || time.Since(start) > 30*time.Second {
			stuck = int(pending)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	took = time.Since(start)
	if err := d.e.pool.QueryRow(t.Context(), `
		SELECT count(*) FROM unnest($1::uuid[]) a(id) LEFT JOIN orders o ON o.id = a.id WHERE o.id IS NULL`, accepted).Scan(&lost); err != nil {
		t.Fatal(err)
	}
	rdb, _ := schematest.NewRedis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Declined orders are released within the same 30s; the rest must be exact.
	rep, err := check.Run(ctx, d.e.pool, check.Config{Deadline: 30 * time.Second, Redis: rdb, Prefix: d.e.prefix})
	if err != nil {
		t.Fatal(err)
	}
	for _, rule := range []string{check.RuleOnce, check.RuleStock, check.RuleShipped, check.RuleReleased, check.RuleTrail} {
		doubled += rep.ViolationsByRule[rule]
	}
	if len(rep.Violations) > 0 {
		t.Errorf("prozess check after the fault:\n%s", rep.Text())
	}
	return lost, doubled, stuck, took
}

// service runs a shell command that stops or starts a shared service.
func service(t *testing.T, script string) {
	t.Helper()
	out, err := exec.Command("bash", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}
}

const (
	pgStop     = `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -n1) main stop -m immediate`
	pgStart    = `pg_isready -q -h 127.0.0.1 || pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -n1) main start; for i in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && exit 0; sleep 1; done; exit 1`
	redisStop  = `redis-cli -h 127.0.0.1 shutdown nosave || true`
	redisStart = `redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || { mkdir -p /var/lib/redis /var/log/redis && redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log; }; for i in $(seq 1 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 1`
)

// TestFaultSuite drives a steady load through participants in separate
// processes and, for each fault, injects it, heals it, and checks that every
// accepted order ends terminal within 30s and that nothing was lost or
// doubled. With -faults.duration it cycles the faults for that long.
func TestFaultSuite(t *testing.T) {
	e := newBrokerFaultEnv(t)
	d := newDeployment(t, e)
	if servicesFaults() {
		// Whatever happens to the test, the machine's PostgreSQL and Redis
		// are left running (this runs before the test database is dropped).
		t.Cleanup(func() {
			service(t, pgStart)
			service(t, redisStart)
		})
	}
	// A second payment instance, so the one the zombie fault freezes loses
	// its partitions to a live member rather than to nobody.
	d.startAs("payment-2", "payment")
	offsets := d.watchOffsets()
	l := d.startLoad(25)
	defer l.halt()

	killRestart := func(name string) func() {
		return func() { d.kill(name); time.Sleep(500 * time.Millisecond); d.start(name) }
	}
	crashAt := func(name, point string) func() {
		return func() {
			d.kill(name)
			p := d.start(name, "--fault", name+":"+point)
			t.Cleanup(func() {
				if t.Failed() {
					d.dump()
				}
			})
			if code := p.wait(t); code != 86 {
				t.Fatalf("%s exited %d, want 86 from the fault point", name, code)
			}
			d.start(name)
		}
	}
	if servicesFaults() && (os.Getenv("PROZESS_TEST_DATABASE_URL") == "" || os.Getenv("PROZESS_TEST_REDIS_ADDR") == "") {
		t.Fatal("PROZESS_FAULT_SERVICES=1 restarts the machine's PostgreSQL and Redis: set PROZESS_TEST_DATABASE_URL " +
			"and PROZESS_TEST_REDIS_ADDR to those servers, or the faults would miss the test's own")
	}
	var services string
	if !servicesFaults() {
		services = "restarting the shared PostgreSQL and Redis would disturb parallel tests; .ci/run runs these with PROZESS_FAULT_SERVICES=1"
	}
	faults := []fault{
		{name: "SIGKILL inventory", inject: killRestart("inventory")},
		{name: "SIGKILL payment", inject: killRestart("payment")},
		{name: "SIGKILL delivery", inject: killRestart("delivery")},
		{name: "SIGKILL status", inject: killRestart("status")},
		{name: "SIGKILL api", inject: killRestart("api")},
		{name: "inventory exits after DB commit, before offset commit", inject: crashAt("inventory", "after-db-commit")},
		{name: "payment exits after DB commit, before offset commit", inject: crashAt("payment", "after-db-commit")},
		{name: "status exits after DB commit, before offset commit", inject: crashAt("status", "after-db-commit")},
		{name: "SIGSTOP one of two payment instances mid-batch past its session timeout, then SIGCONT", inject: d.zombiePayment},
		{name: "broker SIGKILL and restart, 3 times in a row", skip: onCluster("kfake's broker process"), inject: func() {
			for range 3 {
				d.killProc("broker", d.broker)
				d.startBroker(d.brokerArg)
				time.Sleep(time.Second)
			}
		}},
		{name: "PostgreSQL immediate restart under load", skip: services, inject: func() {
			service(t, pgStop)
			d.awaitReady(false, "PostgreSQL") // readiness goes false while the database is away
			time.Sleep(time.Second)
			service(t, pgStart)
			d.awaitReady(true, "")
		}},
		{name: "Redis stopped for 5s, back empty", skip: services, inject: func() {
			service(t, redisStop)
			time.Sleep(2 * time.Second)
			// Without Redis the api keeps answering reads, from PostgreSQL.
			if ids, _ := l.snapshot(); len(ids) > 0 {
				d.mustRead(ids[len(ids)-1])
			}
			time.Sleep(3 * time.Second)
			service(t, redisStart)
		}},
	}
	faults = append(faults, clusterFaults(t, e)...)
	if *faultsRun != "" {
		only, err := regexp.Compile(*faultsRun)
		if err != nil {
			t.Fatalf("-faults.run: %v", err)
		}
		for i := range faults {
			if faults[i].skip == "" && !only.MatchString(faults[i].name) {
				faults[i].skip = "not matched by -faults.run"
			}
		}
	}
	var rows []row
	index := map[string]int{}
	cycleEnd := time.Now().Add(*faultsDuration)
	for cycle := 0; cycle == 0 || time.Now().Before(cycleEnd); cycle++ {
		for _, f := range faults {
			if f.skip != "" {
				if cycle == 0 {
					t.Logf("not run: %s: %s", f.name, f.skip)
				}
				continue
			}
			offsets.during("steady load before " + f.name)
			time.Sleep(2 * time.Second) // steady load before the fault
			before, _ := l.snapshot()
			offsets.during(f.name)
			f.inject()
			time.Sleep(time.Second) // load on the healed system
			accepted, _ := l.snapshot()
			lost, doubled, stuck, took := d.settle(accepted)
			if _, ok := index[f.name]; !ok {
				index[f.name] = len(rows)
				rows = append(rows, row{fault: f.name})
			}
			r := &rows[index[f.name]]
			r.injected++
			r.accepted += len(accepted) - len(before)
			r.lost, r.doubled, r.stuck = r.lost+lost, r.doubled+doubled, r.stuck+stuck
			r.recovery = max(r.recovery, took)
			if lost+doubled+stuck > 0 {
				t.Errorf("%s: %d lost, %d doubled, %d stuck", f.name, lost, doubled, stuck)
			}
			if stuck > 0 {
				t.Logf("lag per group, partition:member after %s:\n%s", f.name, offsets.lag())
				d.dump()
			}
			// A participant that died by itself would be restarted by
			// the next fault and never noticed.
			d.assertAllRunning()
		}
	}
	offsets.during("the load's end and the last settle")
	l.halt()
	l.stop = make(chan struct{}) // halted; the deferred halt must not close it twice
	accepted, _ := l.snapshot()
	lost, doubled, stuck, _ := d.settle(accepted)
	// No fault here makes a record poison: a dead letter would be an
	// inbox that let a redelivery through (the handlers' own keys refuse
	// it, 23505) or a fault that broke a record.
	e.assertNoDeadLetters(strings.Split(d.brokerArg, ","), e.config().DLQTopic())
	// Every participant stops cleanly on SIGTERM, committing what it
	// applied; the committed offsets, read once more after, never went
	// backwards.
	offsets.during("the participants' stop at the end (SIGTERM, in name order)")
	d.stopParticipants()
	for _, v := range offsets.halt() {
		// A broker fault (kfake's broker killed and restarted; an Apache
		// Kafka broker or group coordinator killed) can leave a group's
		// committed offsets a little behind where they were: kfake comes
		// back knowing commits and generations but no members, so a
		// member never told its partitions were lost commits from where it
		// had read; on Apache Kafka a coordinator failover was seen once
		// to set one partition back by one. The records come again and the
		// inbox skips them (no dead letter, nothing lost or doubled:
		// checked above), so it costs redelivery; it is reported here, and
		// open (docs/FAULTS.md, "Known: offsets after a broker fault"). A
		// rewind in any other phase (a participant killed, frozen or
		// stopped) fails the suite.
		if strings.Contains(v, "during: broker SIGKILL") || strings.Contains(v, "during: Kafka: ") {
			t.Logf("known (broker fault; records redelivered and skipped): committed offsets went backwards: %s", v)
			continue
		}
		t.Errorf("committed offsets went backwards: %s", v)
	}
	if d.broker != nil {
		d.assertRunning("broker", d.broker)
		d.broker.stop(t)
	}
	l.mu.Lock()
	refused, odd := l.refused, l.odd
	l.mu.Unlock()
	for _, o := range odd {
		t.Errorf("an answer a careful client must never get: %s", o)
	}
	// Every fault here heals well within the client's 30 tries (30 s and
	// more), so it never gives up; if it did, the reason must be a clean
	// failure (no answer, or a 5xx) and the order must not exist.
	for _, r := range refused {
		t.Errorf("the client gave up on an order after 30 tries; the last failure: %s", r.last)
	}
	keys := make([]string, len(refused))
	for i, r := range refused {
		keys[i] = r.key
	}
	if n := e.count(`SELECT count(*) FROM orders WHERE user_id = 'faults' AND idempotency_key = ANY($1)`, keys); n > 0 {
		t.Errorf("%d orders the client was never told were accepted are in the database", n)
	}
	// The orders in the database are exactly the accepted ones, by the
	// client's own record (one 201 per order, each its own order): more
	// would be an ambiguous commit that doubled, fewer a lost one.
	distinct := map[string]bool{}
	for _, id := range accepted {
		distinct[id] = true
	}
	if len(distinct) != len(accepted) {
		t.Errorf("%d orders accepted under %d distinct ids: two keys were answered with one order", len(accepted), len(distinct))
	}
	if n := e.count(`SELECT count(*) FROM orders WHERE user_id = 'faults'`); n != int64(len(accepted)) {
		t.Errorf("%d orders in the database for %d accepted", n, len(accepted))
		doubled += int(max(0, n-int64(len(accepted))))
	}
	if len(accepted) == 0 {
		t.Error("no order was accepted: the load measured nothing")
	}
	refusedN := len(refused)
	table := renderFaults(rows, len(accepted), refusedN, lost+doubled+stuck)
	t.Log("\n" + table)
	if *faultsReport != "" {
		if err := os.MkdirAll(filepath.Dir(*faultsReport), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(*faultsReport, []byte(table), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func renderFaults(rows []row, accepted, refused, bad int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| fault | injected | orders accepted around it | lost | doubled | stuck | slowest recovery |\n|---|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %d | %.1fs |\n", r.fault, r.injected, r.accepted, r.lost, r.doubled, r.stuck, r.recovery.Seconds())
	}
	fmt.Fprintf(&b, "\nIn all: %d orders accepted, %d given up after 30 tries, %d lost, doubled or stuck at the end.\n", accepted, refused, bad)
	return b.String()
}

// fault is one of the suite's faults: skip says why it does not run here.
type fault struct {
	name   string
	skip   string
	inject func()
}

// onCluster skips a kfake-only fault when the tests run on a real cluster.
func onCluster(what string) string {
	if sagatest.Real() {
		return what + " is not part of a real cluster; the cluster's own broker faults run instead"
	}
	return ""
}

// cluster runs .ci/kafka/cluster (PROZESS_TEST_KAFKA_CLUSTER) with args,
// on the cluster the tests use.
func cluster(t *testing.T, args ...string) {
	t.Helper()
	script := os.Getenv("PROZESS_TEST_KAFKA_CLUSTER")
	out, err := exec.Command("bash", append([]string{script}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", script, args, err, out)
	}
}

// clusterFaults are the broker faults of a real three-node cluster (node N
// is broker id N): the saga topic's leader, a group coordinator, a broker
// under acks=all production, a rolling restart, a frozen broker. Each
// restarts what it killed and waits until it serves again.
func clusterFaults(t *testing.T, e *env) []fault {
	if e.kafka == nil || os.Getenv("PROZESS_TEST_KAFKA_CLUSTER") == "" {
		return nil
	}
	adm := func() (*kadm.Client, func()) {
		cl, err := kgo.NewClient(kgo.SeedBrokers(e.kafka.Brokers...))
		if err != nil {
			t.Fatal(err)
		}
		return kadm.NewClient(cl), cl.Close
	}
	leaderOf := func(partition int32) string {
		a, done := adm()
		defer done()
		md, err := a.Metadata(t.Context(), e.kafka.Topic)
		if err != nil {
			t.Fatal(err)
		}
		return strconv.Itoa(int(md.Topics[e.kafka.Topic].Partitions[partition].Leader))
	}
	coordinatorOf := func(group string) string {
		a, done := adm()
		defer done()
		gs, err := a.DescribeGroups(t.Context(), group)
		if err != nil {
			t.Fatal(err)
		}
		return strconv.Itoa(int(gs[group].Coordinator.NodeID))
	}
	killRestart := func(node string) {
		cluster(t, "node-signal", node, "KILL")
		time.Sleep(3 * time.Second)
		cluster(t, "node-start", node)
	}
	return []fault{
		{name: "Kafka: SIGKILL the leader of the saga topic's partition 0, restart it", inject: func() { killRestart(leaderOf(0)) }},
		{name: "Kafka: SIGKILL the group coordinator of inventory's group, restart it", inject: func() {
			killRestart(coordinatorOf(e.kafka.GroupPrefix + "inventory"))
		}},
		{name: "Kafka: SIGKILL a broker while the relay produces with acks=all, restart it", inject: func() {
			// The leader of the partition the next orders go to, whichever
			// it is, is one of three; kill broker 3 mid-load.
			killRestart("3")
		}},
		{name: "Kafka: rolling restart of all three brokers", inject: func() {
			for _, n := range []string{"1", "2", "3"} {
				cluster(t, "node-stop", n)
				cluster(t, "node-start", n)
			}
		}},
		{name: "Kafka: SIGSTOP a broker past its session timeout, then SIGCONT", inject: func() {
			n := leaderOf(1)
			cluster(t, "node-signal", n, "STOP")
			time.Sleep(20 * time.Second) // broker.session.timeout.ms is 9 s: the controller fences it
			cluster(t, "node-signal", n, "CONT")
		}},
	}
}
