package app_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// binary is the prozess executable TestMain builds for the process tests.
var binary string

func TestMain(m *testing.M) {
	flag.Parse()
	if flag.Lookup("test.list").Value.String() != "" {
		os.Exit(m.Run()) // listing names (.ci/kafka/suites-run) needs no binary
	}
	dir, err := os.MkdirTemp("", "prozess-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "prozess")
	build := exec.Command("go", "build", "-o", binary, "..")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building prozess:", err)
		os.Exit(1)
	}
	code := schematest.Main(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is one prozess process.
type proc struct {
	cmd    *exec.Cmd
	lines  chan map[string]any // its JSON log lines
	exit   chan error
	mu     sync.Mutex
	recent []string // its last lines, for failure messages
}

func (p *proc) tail() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.recent, "\n")
}

// spawn starts `prozess args...` with env and stops it (SIGKILL) at the
// end of the test if it is still running.
func spawn(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	return spawnExe(t, binary, env, args...)
}

// spawnExe is spawn with another executable (an older release's).
func spawnExe(t *testing.T, exe string, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, lines: make(chan map[string]any, 1000), exit: make(chan error, 1)}
	read := func(r io.Reader, stdout bool) {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			m := map[string]any{}
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				m = map[string]any{"msg": "output", "line": sc.Text(), "stdout": stdout}
			}
			p.mu.Lock()
			p.recent = append(p.recent, sc.Text())
			if len(p.recent) > 40 {
				p.recent = p.recent[1:]
			}
			p.mu.Unlock()
			if os.Getenv("PROZESS_TEST_LOG") != "" {
				t.Logf("%s: %s", args[0], sc.Text())
			}
			select {
			case p.lines <- m:
			default:
			}
		}
	}
	go read(stdout, true)
	go func() { read(stderr, false); p.exit <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-p.exit
		}
	})
	return p
}

// await returns the first log line for which match is true.
func (p *proc) await(t *testing.T, what string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case m := <-p.lines:
			if match(m) {
				return m
			}
		case err := <-p.exit:
			p.exit <- err
			t.Fatalf("%v exited (%v) before %s; its last lines:\n%s", p.cmd.Args, err, what, p.tail())
		case <-timeout:
			t.Fatalf("%v: no %s within 30s; its last lines:\n%s", p.cmd.Args, what, p.tail())
		}
	}
}

func (p *proc) ready(t *testing.T) map[string]any {
	return p.await(t, "ready line", func(m map[string]any) bool { return m["msg"] == "prozess ready" })
}

// stop sends SIGTERM and checks the process ends cleanly.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(t); code != 0 {
		t.Fatalf("%v exited %d after SIGTERM, want 0", p.cmd.Args, code)
	}
}

func (p *proc) wait(t *testing.T) int {
	t.Helper()
	select {
	case err := <-p.exit:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(60 * time.Second):
		t.Fatalf("%v did not exit within 60s; its last lines:\n%s", p.cmd.Args, p.tail())
		return -1
	}
}

// Participants in separate processes on `prozess broker`, as in production
// with one container each: the saga completes, survives a broker restart, and
// a participant that exits between its database commit and its offset commit
// loses and doubles nothing.
func TestParticipantsInSeparateProcesses(t *testing.T) {
	e := newEnv(t)
	brokerDir := t.TempDir()
	broker := spawn(t, nil, "broker", "--addr", "127.0.0.1:0", "--data-dir", brokerDir, "--log-format", "json")
	addr := broker.await(t, "broker address", func(m map[string]any) bool { return m["stdout"] == true })["line"].(string)
	env := []string{
		"PROZESS_DATABASE_URL=" + e.dbURL,
		"PROZESS_REDIS_ADDR=" + schematest.RedisAddr(t),
		"PROZESS_REDIS_PREFIX=" + e.prefix,
		"PROZESS_KAFKA_BROKERS=" + addr,
		"PROZESS_LOG_FORMAT=json", "PROZESS_RATE_LIMIT=0", "PROZESS_ADMIN_ADDR=127.0.0.1:0",
		"PROZESS_PAYMENT_DECLINE_RATE=0",
	}
	apiProc := spawn(t, env, "serve", "api", "--http-addr", "127.0.0.1:0")
	r := &running{e: e, url: "http://" + apiProc.ready(t)["http"].(string)}
	invpay := spawn(t, env, "serve", "inventory", "payment")
	invpay.ready(t)
	rest := spawn(t, env, "serve", "delivery", "status")
	rest.ready(t)

	initial := r.stock(t)
	o := r.order(t, "u1", "", mouse(1))
	if got := r.await(t, o.OrderID.String(), 20*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order ended %s", got.Status)
	}

	// The broker restarts on the same address and data; nothing is lost.
	broker.stop(t)
	broker = spawn(t, nil, "broker", "--addr", addr, "--data-dir", brokerDir, "--log-format", "json")
	broker.await(t, "broker address", func(m map[string]any) bool { return m["stdout"] == true })
	o2 := r.order(t, "u1", "", mouse(2))
	if got := r.await(t, o2.OrderID.String(), 30*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("order after broker restart ended %s", got.Status)
	}

	// Inventory exits abruptly right after its first database commit.
	invpay.stop(t)
	var ids []string
	for i := range 5 {
		ids = append(ids, r.order(t, "u2", "", mouse(1+i)).OrderID.String())
	}
	crashing := spawn(t, env, "serve", "inventory", "payment", "--fault", "inventory:after-db-commit")
	if code := crashing.wait(t); code != 86 {
		t.Fatalf("faulted process exited %d, want 86 from the fault point", code)
	}
	if n := e.count(`SELECT count(DISTINCT order_id) FROM reservations`); n < 3 {
		t.Fatalf("only %d orders reserved before the crash; the fault fired too early", n)
	}
	invpay = spawn(t, env, "serve", "inventory", "payment")
	invpay.ready(t)
	for _, id := range ids {
		if got := r.await(t, id, 30*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s", id, got.Status)
		}
	}
	e.awaitQuiet(20 * time.Second)
	e.assertExactlyOnce(initial, r.stock(t))
	if n := e.count(`SELECT count(*) FROM shipments`); n != 7 {
		t.Fatalf("%d shipments for 7 orders", n)
	}
	e.assertInboxOnce()
	e.assertNoDeadLetters([]string{addr}, app.DefaultConfig().DLQTopic())
	for _, p := range []*proc{apiProc, invpay, rest, broker} {
		p.stop(t)
	}
}
