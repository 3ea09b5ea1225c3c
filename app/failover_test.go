package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prozess/prozess/app/embedded"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
	"github.com/prozess/prozess/schema/schematest"
)

// pgPair is a PostgreSQL primary and a streaming standby of the test's
// own, on two free ports of 127.0.0.1 (never the machine's server: the
// test kills the primary).
type pgPair struct {
	bin                    string
	primary, standby       string // host:port
	primaryDir, standbyDir string
	pass                   string
	synchronous            bool
	walSender              int  // SIGSTOPped by stallReplication
	killed                 bool // by killPrimary
}

// standbyName is the standby's application_name, which the primary's
// synchronous_standby_names names.
const standbyName = "standby1"

// startPGPair starts a primary with embedded.StartPostgres (as the postgres
// user when the test runs as root, as every embedded server does), copies
// it with `pg_basebackup -R` (which writes the standby's primary_conninfo
// and standby.signal), starts the copy as a hot standby streaming from the
// primary, and, when synchronous, makes it the primary's synchronous
// standby (synchronous_commit is on by default): a commit is acknowledged
// only once the standby has flushed its WAL. It returns once
// pg_stat_replication shows the standby streaming, in sync when asked.
//
// It needs the machine's PostgreSQL binaries, pg_basebackup among them
// (the fetched ones have none): without them it skips, as the tests that
// need Prometheus or a browser do, unless PROZESS_REQUIRE_POSTGRES_TOOLS=1
// (CI), where it fails.
func startPGPair(t *testing.T, synchronous bool) *pgPair {
	t.Helper()
	missing := func(msg string) {
		t.Helper()
		if os.Getenv("PROZESS_REQUIRE_POSTGRES_TOOLS") == "1" {
			t.Fatal(msg + "; PROZESS_REQUIRE_POSTGRES_TOOLS=1 requires them")
		}
		t.Skip(msg)
	}
	bin, local := embedded.FindBinaries()
	if !local {
		missing("the failover tests need the machine's PostgreSQL binaries (initdb, postgres, pg_basebackup) and found none: " +
			"apt-get install postgresql (.ci/services does), or set PROZESS_POSTGRES_BIN to their directory")
	}
	if _, err := os.Stat(filepath.Join(bin, "pg_basebackup")); err != nil {
		missing(fmt.Sprintf("the failover tests need pg_basebackup beside the server in %s: %v (apt-get install postgresql, as .ci/services does)", bin, err))
	}
	root := reachableTempDir(t)
	p := &pgPair{bin: bin, primary: freeAddr(t), standby: freeAddr(t), primaryDir: filepath.Join(root, "primary"),
		standbyDir: filepath.Join(root, "standby"), synchronous: synchronous}
	log := slog.New(slog.DiscardHandler)
	primary, err := embedded.StartPostgres(t.Context(), p.primaryDir, p.primary, t.TempDir(), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { primary.Stop() })
	// Run before primary.Stop and after the system stopped: a stalled WAL
	// sender would hold the stop for its whole 40 s; a SIGKILLed server
	// leaves its shared memory (SysV and /dev/shm) behind, which only a
	// start on the same data directory removes, so it is started once
	// more and stopped cleanly.
	rerun := t.TempDir()
	t.Cleanup(func() {
		if p.walSender != 0 {
			syscall.Kill(p.walSender, syscall.SIGCONT)
		}
		if !p.killed {
			return
		}
		again, err := embedded.StartPostgres(context.Background(), p.primaryDir, p.primary, rerun, log)
		if err != nil {
			t.Errorf("starting the killed primary again to free its shared memory: %v", err)
			return
		}
		if err := again.Stop(); err != nil {
			t.Errorf("stopping the killed primary cleanly: %v", err)
		}
	})
	pass, err := os.ReadFile(p.primaryDir + ".password")
	if err != nil {
		t.Fatal(err)
	}
	p.pass = strings.TrimSpace(string(pass))

	// Replication connections match only a "replication" line in
	// pg_hba.conf, never "all".
	hba, err := os.OpenFile(filepath.Join(p.primaryDir, "pg_hba.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = hba.WriteString("host replication all 127.0.0.1/32 scram-sha-256\n")
	hba.Close()
	if err != nil {
		t.Fatal(err)
	}
	p.exec(t, p.primary, `SELECT pg_reload_conf()`)

	// The copy is taken as this user and then handed to whoever owns the
	// primary's data (the postgres user, as root), which the server
	// requires of its data directory.
	cmd := exec.Command(filepath.Join(bin, "pg_basebackup"),
		"-d", fmt.Sprintf("host=%s port=%s user=postgres password=%s application_name=%s", hostOf(p.primary), portOf(p.primary), p.pass, standbyName),
		"-D", p.standbyDir, "-R", "-X", "stream", "-c", "fast")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pg_basebackup: %v\n%s", err, out)
	}
	fi, err := os.Stat(p.primaryDir)
	if err != nil {
		t.Fatal(err)
	}
	owner := fi.Sys().(*syscall.Stat_t)
	if err := filepath.WalkDir(p.standbyDir, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, int(owner.Uid), int(owner.Gid))
	}); err != nil {
		t.Fatal(err)
	}
	// embedded.StartPostgres finds the data directory made and its
	// password recorded, so it only starts the server: standby.signal
	// makes it a standby.
	if err := os.WriteFile(p.standbyDir+".password", pass, 0o600); err != nil {
		t.Fatal(err)
	}
	standby, err := embedded.StartPostgres(t.Context(), p.standbyDir, p.standby, t.TempDir(), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { standby.Stop() })
	// Set after the copy, so the standby does not inherit it: promoted,
	// it has no standby of its own to wait for.
	if synchronous {
		p.exec(t, p.primary, `ALTER SYSTEM SET synchronous_standby_names = '`+standbyName+`'`)
		p.exec(t, p.primary, `SELECT pg_reload_conf()`)
	}
	want := "async"
	if synchronous {
		want = "sync"
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var state, sync string
		err := p.queryRow(t, p.primary, `SELECT state, sync_state FROM pg_stat_replication WHERE application_name = $1`,
			[]any{standbyName}, &state, &sync)
		if err == nil && state == "streaming" && sync == want {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("standby not streaming %s within 30s: state %q, sync_state %q, %v", want, state, sync, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// url is a multi-host URL of database on the pair: the standby first, so
// a URL without target_session_attrs=read-write would reach the read-only
// standby before the failover; with it, pgx takes whichever server
// accepts writes.
func (p *pgPair) url(database string) string {
	return fmt.Sprintf("postgres://postgres:%s@%s,%s/%s?sslmode=disable&target_session_attrs=read-write", p.pass, p.standby, p.primary, database)
}

func (p *pgPair) connect(t *testing.T, addr string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres:%s@%s/postgres?sslmode=disable", p.pass, addr))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

func (p *pgPair) exec(t *testing.T, addr, sql string) {
	t.Helper()
	conn := p.connect(t, addr)
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), sql); err != nil {
		t.Fatalf("%s on %s: %v", sql, addr, err)
	}
}

func (p *pgPair) queryRow(t *testing.T, addr, sql string, args []any, dest ...any) error {
	t.Helper()
	conn := p.connect(t, addr)
	defer conn.Close(context.Background())
	return conn.QueryRow(t.Context(), sql, args...).Scan(dest...)
}

// stallReplication freezes the primary's WAL sender (SIGSTOP): the
// standby receives nothing more, as across a slow or cut link. A
// synchronous primary then acknowledges no commit; an asynchronous one
// goes on acknowledging commits the standby does not have.
func (p *pgPair) stallReplication(t *testing.T) {
	t.Helper()
	var pid int
	if err := p.queryRow(t, p.primary, `SELECT pid FROM pg_stat_replication WHERE application_name = $1`, []any{standbyName}, &pid); err != nil {
		t.Fatalf("finding the WAL sender: %v", err)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	p.walSender = pid
}

// killPrimary SIGKILLs the primary's postmaster and every process of it
// (backends, WAL sender, checkpointer), as a machine dying would: no
// shutdown, no last WAL sent. Its children are listed first: once the
// postmaster is gone they belong to init.
func (p *pgPair) killPrimary(t *testing.T) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(p.primaryDir, "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	postmaster, err := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	if err != nil {
		t.Fatalf("postmaster.pid: %v", err)
	}
	children := childrenOf(postmaster)
	if err := syscall.Kill(postmaster, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.killed = true
	for _, pid := range children {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(pid int) []int {
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, path := range procs {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so after ")".
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			child, _ := strconv.Atoi(strings.Split(path, "/")[2])
			out = append(out, child)
		}
	}
	return out
}

// promote makes the standby a primary (pg_promote waits until it is) and
// returns its new timeline (from the WAL file it writes: the control
// file's changes only at the next checkpoint).
func (p *pgPair) promote(t *testing.T) int {
	t.Helper()
	var ok bool
	if err := p.queryRow(t, p.standby, `SELECT pg_promote(true, 60)`, nil, &ok); err != nil || !ok {
		t.Fatalf("pg_promote: %v %v", ok, err)
	}
	var timeline int
	if err := p.queryRow(t, p.standby, `SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int`, nil, &timeline); err != nil {
		t.Fatal(err)
	}
	return timeline
}

func hostOf(addr string) string { h, _, _ := net.SplitHostPort(addr); return h }
func portOf(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }

// accepted is one order a client was answered 201 for.
type accepted struct {
	key string
	id  string
	at  time.Time
}

// orderClient places orders as a careful client does: each with an
// Idempotency-Key, retried with the same key on a 5xx or a connection
// error until it is answered 201; it records every 201 and every other
// answer.
type orderClient struct {
	r    *running
	body []byte

	mu       sync.Mutex
	accepted []accepted
	refused  map[string]int // answer ("503", "500", "conn") -> count
	bad      []string       // answers no retry can mend (4xx)
	noRetry  int            // 503s without Retry-After
}

func (c *orderClient) place(key string, giveUp time.Time) {
	for {
		req, _ := http.NewRequest(http.MethodPost, c.r.url+"/orders", bytes.NewReader(c.body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+c.r.e.keyFor("u1"))
		req.Header.Set("Idempotency-Key", key)
		resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
		answer := "conn"
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			answer = strconv.Itoa(resp.StatusCode)
			switch {
			case resp.StatusCode == http.StatusCreated:
				var res api.CreateResponse
				json.Unmarshal(b, &res)
				c.mu.Lock()
				c.accepted = append(c.accepted, accepted{key: key, id: res.OrderID.String(), at: time.Now()})
				c.mu.Unlock()
				return
			case resp.StatusCode < 500:
				c.mu.Lock()
				c.bad = append(c.bad, fmt.Sprintf("%s: %d %s", key, resp.StatusCode, b))
				c.mu.Unlock()
				return
			case resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") == "":
				c.mu.Lock()
				c.noRetry++
				c.mu.Unlock()
			}
		}
		c.mu.Lock()
		c.refused[answer]++
		c.mu.Unlock()
		if time.Now().After(giveUp) {
			c.mu.Lock()
			c.bad = append(c.bad, fmt.Sprintf("%s: gave up, last answer %s", key, answer))
			c.mu.Unlock()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// failoverRun is what one failover under load left: the system, still
// running on the promoted server, the client's record, and the moments.
type failoverRun struct {
	e        *env
	r        *running
	pool     *pgxpool.Pool // on the multi-host URL: the promoted server
	pair     *pgPair
	c        *orderClient
	initial  map[string]int64
	stalled  time.Time // the replication link stalled
	killed   time.Time // every primary process SIGKILLed
	promoted time.Time // pg_promote returned
	first    time.Time // the first 201 after the promotion
	loadEnd  time.Time
	lost     []accepted // answered 201, not in the promoted database
	copies   [2]string  // statuscache.Identity before and after
}

// failover runs prozess on a primary and a standby of the test's own
// (synchronous or not) through a multi-host URL, places orders with four
// careful clients, stalls the replication link for half a second, kills
// every primary process, promotes the standby a second later, and goes on
// placing orders until 3 s after the promoted server accepted the first.
func failover(t *testing.T, synchronous bool) *failoverRun {
	t.Helper()
	pair := startPGPair(t, synchronous)
	// The database exists on both servers before prozess starts, as a
	// deployment's does: pgx stops at the first host that has no such
	// database (3D000) instead of trying the next, so a database prozess
	// created on the primary and the standby had not replayed yet would
	// fail the first connection through the standby-first URL.
	pair.exec(t, pair.primary, `CREATE DATABASE prozess`)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var n int
		if err := pair.queryRow(t, pair.standby, `SELECT count(*) FROM pg_database WHERE datname = 'prozess'`, nil, &n); err == nil && n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the standby has not replayed CREATE DATABASE within 10s")
		}
	}
	e := envOn(t, pair.url("prozess"))
	r := e.start(e.config())
	pool := e.pool
	e.keyFor("u1")
	e.keyFor("admin")
	// Stock for any number of orders: every order should ship.
	if _, err := pool.Exec(t.Context(), `UPDATE products SET stock = 1000000, received = 1000000 WHERE id = 'prod-mouse'`); err != nil {
		t.Fatal(err)
	}
	f := &failoverRun{e: e, r: r, pool: pool, pair: pair, initial: r.stock(t)}
	body, _ := json.Marshal(api.CreateRequest{UserID: "u1", Items: []event.Item{mouse(1)}})
	f.c = &orderClient{r: r, body: body, refused: map[string]int{}}
	halt := clients(4, func(w, i int) { f.c.place(fmt.Sprintf("w%d-%d", w, i), time.Now().Add(45*time.Second)) })
	defer halt()
	before, err := statuscache.Identity(t.Context(), pool)
	if err != nil {
		t.Fatal(err)
	}
	f.copies[0] = before
	time.Sleep(1500 * time.Millisecond)
	pair.stallReplication(t)
	f.stalled = time.Now()
	time.Sleep(500 * time.Millisecond)
	pair.killPrimary(t)
	f.killed = time.Now()
	// An operator, or a failover manager, notices and promotes.
	time.Sleep(time.Second)
	timeline := pair.promote(t)
	f.promoted = time.Now()
	t.Logf("replication stalled, primary killed 0.5s later, standby promoted %s after the kill (timeline %d)",
		f.promoted.Sub(f.killed).Round(time.Millisecond), timeline)
	for deadline := f.promoted.Add(30 * time.Second); f.first.IsZero(); {
		f.c.mu.Lock()
		for _, a := range f.c.accepted {
			if a.at.After(f.promoted) && (f.first.IsZero() || a.at.Before(f.first)) {
				f.first = a.at
			}
		}
		f.c.mu.Unlock()
		if time.Now().After(deadline) {
			halt()
			t.Fatalf("no order accepted within 30s of the promotion; answers meanwhile: %v", f.c.refused)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(3 * time.Second)
	halt()
	f.loadEnd = time.Now()

	var port int
	if err := pool.QueryRow(t.Context(), `SELECT inet_server_port()`).Scan(&port); err != nil || strconv.Itoa(port) != portOf(pair.standby) {
		t.Fatalf("the test's pool is on port %d (%v), want the promoted standby's %s", port, err, portOf(pair.standby))
	}
	if f.copies[1], err = statuscache.Identity(t.Context(), pool); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(f.c.accepted))
	for i, a := range f.c.accepted {
		ids[i] = a.id
	}
	rows, err := pool.Query(t.Context(), `SELECT id::text FROM orders WHERE id::text = ANY($1)`, ids)
	if err != nil {
		t.Fatal(err)
	}
	found, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range f.c.accepted {
		if !slices.Contains(found, a.id) {
			f.lost = append(f.lost, a)
		}
	}
	return f
}

// count counts the accepted orders answered between from and to.
func (f *failoverRun) count(from, to time.Time) int {
	n := 0
	for _, a := range f.c.accepted {
		if a.at.After(from) && a.at.Before(to) {
			n++
		}
	}
	return n
}

// The primary PostgreSQL dies (SIGKILL of every server process) under
// load, right after its link to the standby stalled, and the synchronous
// standby is promoted; prozess, running across it on a multi-host URL
// with target_session_attrs=read-write, follows to the promoted server
// without a restart. Nothing a client was answered 201 for is lost: every
// such order is in the promoted database and finishes; nothing is doubled
// (one order per Idempotency-Key, no order no client was answered for,
// the effects once each, prozess check clean), nothing is dead-lettered
// or parked, and while no server takes writes the api answers 503 with
// Retry-After, never 500.
//
// The stall is what makes the property testable on one machine: the
// standby is milliseconds behind at most, so a primary killed at any
// moment would rarely hold an acknowledged commit the standby lacks. A
// synchronous primary acknowledges nothing during the stall; an
// asynchronous one acknowledges commits the standby never gets
// (TestFailoverToAsynchronousStandbyLosesAcknowledgedOrders).
func TestFailoverToSynchronousStandbyLosesNothing(t *testing.T) {
	t.Parallel()
	f := failover(t, true)
	e, r, c := f.e, f.r, f.c
	if len(f.lost) > 0 {
		var lost []string
		for _, a := range f.lost[:min(len(f.lost), 5)] {
			lost = append(lost, fmt.Sprintf("%s (key %s, answered %s before the kill)", a.id, a.key, f.killed.Sub(a.at).Round(time.Millisecond)))
		}
		t.Fatalf("%d of %d orders answered 201 are not in the promoted database (lost in the failover): %s",
			len(f.lost), len(c.accepted), strings.Join(lost, ", "))
	}
	if len(c.bad) > 0 {
		t.Errorf("%d POSTs not accepted in the end, or refused for good: %s", len(c.bad), strings.Join(c.bad[:min(len(c.bad), 5)], "; "))
	}
	if c.refused["500"] > 0 || c.noRetry > 0 {
		t.Errorf("while no server took writes the api answered 500 %d times and 503 without Retry-After %d times; want 503 with Retry-After: %v",
			c.refused["500"], c.noRetry, c.refused)
	}
	if n := e.count(`SELECT count(*) FROM orders WHERE user_id = 'u1'`); n != int64(len(c.accepted)) {
		t.Errorf("%d orders in the promoted database, %d answered 201", n, len(c.accepted))
	}
	// The failover happened under load, and clients met it: orders were
	// being accepted in the second before the stall, and refused while no
	// server took writes.
	if n := f.count(f.stalled.Add(-time.Second), f.stalled); n == 0 {
		t.Error("no order accepted in the second before the replication link stalled: the failover was not under load")
	}
	if c.refused["503"] == 0 {
		t.Errorf("no 503 while no server took writes (answers %v): the clients never met the failover", c.refused)
	}
	for _, a := range c.accepted {
		if e.count(`SELECT count(*) FROM orders WHERE id = $1 AND idempotency_key = $2`, a.id, a.key) != 1 {
			t.Errorf("order %s is not the one of key %s", a.id, a.key)
		}
	}

	// Every accepted order finishes.
	e.awaitQuiet(60 * time.Second)
	settled := time.Now()
	t.Logf("PostgreSQL failover to a synchronous standby: %d orders accepted (%d answered during the stall, %d between the kill and pg_promote returning, which it does up to 100 ms after the server takes writes), "+
		"0 lost; answers while no server took writes: %v; first order accepted %s after the promotion; all finished %s after it (%s after the load ended)",
		len(c.accepted), f.count(f.stalled, f.killed), f.count(f.killed, f.promoted), c.refused, f.first.Sub(f.promoted).Round(time.Millisecond),
		settled.Sub(f.promoted).Round(time.Millisecond), settled.Sub(f.loadEnd).Round(time.Millisecond))
	// The promoted server is another copy of the database for the status
	// cache (a new timeline): a process started now binds its keys anew,
	// since it cannot know whether the failover lost acknowledged commits
	// (an asynchronous standby, a point-in-time restore look the same).
	// The running system keeps its binding; every cache hit it answers is
	// confirmed in PostgreSQL, so its GETs agree with the promoted server.
	if sys, _, _ := strings.Cut(f.copies[0], "."); f.copies[0] == f.copies[1] || !strings.HasPrefix(f.copies[1], sys+".") {
		t.Errorf("the cache's copy identity went from %s to %s, want the same system on a new timeline", f.copies[0], f.copies[1])
	}
	// GET answers what the promoted database says, from the cache or not.
	for _, a := range c.accepted[:min(len(c.accepted), 200)] {
		var o api.Order
		r.getJSON(t, "/orders/"+a.id, &o)
		var truth string
		f.pool.QueryRow(t.Context(), `SELECT status FROM orders WHERE id = $1`, a.id).Scan(&truth)
		if string(o.Status) != truth {
			t.Errorf("GET /orders/%s: %s, the promoted database says %s", a.id, o.Status, truth)
		}
	}
	e.assertNoDeadLetters(r.sys.Brokers(), e.config().DLQTopic())
	if n := e.count(`SELECT count(*) FROM parked`); n != 0 {
		t.Errorf("%d parked records", n)
	}
	e.assertExactlyOnce(f.initial, r.stock(t))
	e.checkClean(t, r.sys.Brokers())
}

// What the synchronous standby prevents, shown: the same failover with
// the standby asynchronous (no synchronous_standby_names). The primary
// goes on acknowledging commits while its link to the standby is stalled;
// those orders were answered 201 and are gone after the promotion, and
// they are exactly the ones acknowledged after the stall began.
func TestFailoverToAsynchronousStandbyLosesAcknowledgedOrders(t *testing.T) {
	t.Parallel()
	f := failover(t, false)
	during := f.count(f.stalled, f.killed)
	t.Logf("PostgreSQL failover to an asynchronous standby: %d orders accepted, %d during the stall, %d of them lost", len(f.c.accepted), during, len(f.lost))
	if during == 0 || len(f.lost) == 0 {
		t.Fatalf("%d orders accepted during the stall, %d lost: an asynchronous primary should acknowledge commits its standby never got", during, len(f.lost))
	}
	// The running system cached some of the lost orders before the
	// failover; GET answers what the promoted database says: none.
	for _, a := range f.lost[:min(len(f.lost), 50)] {
		if got := f.r.timedDo(t, http.MethodGet, "/orders/"+a.id, "admin", "", nil); got.code != http.StatusNotFound {
			t.Errorf("GET /orders/%s, lost in the failover: %d %s (source %q), want 404", a.id, got.code, got.body, got.source)
		}
	}
	for _, a := range f.lost {
		// 100 ms: a commit acknowledged just before the stall may not
		// have been sent yet.
		if a.at.Before(f.stalled.Add(-100 * time.Millisecond)) {
			t.Errorf("order %s, answered %s before the stall, was lost", a.id, f.stalled.Sub(a.at).Round(time.Millisecond))
		}
	}
}

// setReadOnly makes the test's database refuse writes (or take them
// again), as a standby or a primary being demoted does: every new
// session's transactions are read-only, and the open sessions are ended
// so every pool reconnects (and the test's own pool starts afresh).
func (e *env) setReadOnly(t *testing.T, on bool) {
	t.Helper()
	cfg, err := pgx.ParseConfig(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := pgx.Connect(t.Context(), schematest.AdminURL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	db := pgx.Identifier{cfg.Database}.Sanitize()
	sql := `ALTER DATABASE ` + db + ` RESET default_transaction_read_only`
	if on {
		sql = `ALTER DATABASE ` + db + ` SET default_transaction_read_only = on`
	}
	if _, err := admin.Exec(t.Context(), sql); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(t.Context(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, cfg.Database); err != nil {
		t.Fatal(err)
	}
	e.pool.Reset()
}

// A database that refuses writes for a while (SQLSTATE 25006,
// read_only_sql_transaction: a standby not promoted yet, or reached
// through a URL without target_session_attrs=read-write; a primary made
// read-only) is the world's state, not a record's fault: the consumer
// retries what it cannot write for as long as it lasts, past
// --poison-after, and applies it once writes are taken again, never
// trying to dead-letter it; the api answers 503 with Retry-After
// meanwhile. Before, 25006 was an error of neither kind: past
// --poison-after the record was marked poison and every retry tried to
// dead-letter it (logged at error, counted as a dead-letter failure; the
// dead letter itself needs writes, so the record still waited, and a
// database taking writes again before the handler did would have parked
// a good record), and the api answered 500, which a client cannot tell
// from a bug. Seen failing both ways: 25006 left unknown (4 dead-letter
// attempts) and dropped from the api's list (a 500).
func TestReadOnlyDatabaseIsWaitedOutNotDeadLettered(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.PoisonAfter = time.Second
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "inventory", "payment", "status")
	e.keyFor("u1")
	e.keyFor("admin")
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	r.awaitStatus(t, id, event.StatusPaid, 30*time.Second)

	e.setReadOnly(t, true)
	readOnly := true
	defer func() {
		if readOnly {
			e.setReadOnly(t, false)
		}
	}()
	// Delivery starts on the read-only database (it migrates and seeds
	// nothing: those would write) and cannot record its shipment.
	dcfg := cfg
	dcfg.Migrate, dcfg.Seed = false, false
	delivery := e.start(dcfg, "delivery")
	body, _ := json.Marshal(api.CreateRequest{UserID: "u1", Items: []event.Item{mouse(1)}})
	// The first answers meet the ended sessions (57P01); those after, the
	// read-only database itself (25006). Every one is a 503 to retry.
	for i := range 5 {
		got := r.timedDo(t, http.MethodPost, "/orders", "u1", "during", body)
		if got.code != http.StatusServiceUnavailable || got.retryAfter == "" {
			t.Errorf("POST %d while the database is read-only: %d (Retry-After %q) %s, want 503 with Retry-After", i+1, got.code, got.retryAfter, got.body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(3 * cfg.PoisonAfter)
	if n := e.count(`SELECT count(*) FROM shipments WHERE order_id = $1`, id); n != 0 {
		t.Fatalf("%d shipments written to a read-only database", n)
	}
	// It tried, past --poison-after, and was refused (not idle).
	if n := value(scrape(t, "http://"+delivery.sys.AdminAddr()+"/metrics"), `prozess_consumer_retries_total{participant="delivery"}`); n < 2 {
		t.Fatalf("delivery retried %v times while the database was read-only; want it to have met the refusal", n)
	}
	e.setReadOnly(t, false)
	readOnly = false
	// The api's pooled sessions were ended with the others: a request on
	// one that is not known dead yet is answered 503, which a client
	// retries, as this one does.
	retried := r.retry503(t, http.MethodGet, "/orders/"+id, "admin", "", nil)
	retried += r.retry503(t, http.MethodPost, "/orders", "u1", "during", body)
	t.Logf("%d requests answered 503 while the api's pool met its ended sessions", retried)
	if o := r.await(t, id, 30*time.Second); o.Status != event.StatusShipped {
		t.Errorf("order %s ended %s once the database took writes again, want SHIPPED", id, o.Status)
	}
	if n := delivery.sys.Stats()["delivery"].DeadLetterFailures.Load(); n != 0 {
		t.Errorf("delivery tried %d times to dead-letter a record it could not write to a read-only database; want it waited out", n)
	}
	again := r.order(t, "u1", "during", mouse(1)).OrderID.String()
	r.await(t, again, 30*time.Second)
	e.awaitQuiet(30 * time.Second)
	e.assertNoDeadLetters(r.sys.Brokers(), cfg.DLQTopic())
	e.checkClean(t, r.sys.Brokers())
}

// retry503 sends a request as a client that follows Retry-After does:
// again (with the same Idempotency-Key) while it is answered 503 with
// Retry-After, for up to 10 s; any other answer but 200 or 201 fails the
// test. It returns how many 503s it met.
func (r *running) retry503(t *testing.T, method, path, user, key string, body []byte) int {
	t.Helper()
	for n, deadline := 0, time.Now().Add(10*time.Second); ; n++ {
		got := r.timedDo(t, method, path, user, key, body)
		switch {
		case got.code == http.StatusOK || got.code == http.StatusCreated:
			return n
		case got.code != http.StatusServiceUnavailable || got.retryAfter == "":
			t.Fatalf("%s %s: %d (Retry-After %q) %s", method, path, got.code, got.retryAfter, got.body)
		case time.Now().After(deadline):
			t.Fatalf("%s %s: still 503 after 10s: %s", method, path, got.body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
