package app_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
)

// readmeBlocks returns the ```sh blocks of the README section whose heading
// is heading, up to the next heading of the same or a higher level.
func readmeBlocks(t *testing.T, heading string) []string {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	level := strings.Count(strings.Fields(heading)[0], "#")
	var blocks []string
	in, inBlock := false, false
	var cur strings.Builder
	for _, line := range strings.Split(string(b), "\n") {
		if !inBlock && strings.HasPrefix(line, "#") {
			l := len(line) - len(strings.TrimLeft(line, "#"))
			if line == heading {
				in = true
				continue
			}
			if in && l <= level {
				break
			}
		}
		if !in {
			continue
		}
		switch {
		case !inBlock && line == "```sh":
			inBlock = true
			cur.Reset()
		case inBlock && line == "```":
			inBlock = false
			blocks = append(blocks, cur.String())
		case inBlock:
			cur.WriteString(line + "\n")
		}
	}
	if len(blocks) == 0 {
		t.Fatalf("README has no sh block under %q", heading)
	}
	return blocks
}

// readmePorts are the ports a README run moves, so it runs beside other
// tests and the machine's own servers: the api, Kafka, PostgreSQL, Redis.
type readmePorts struct{ http, kafka, pg, redis int }

func newReadmePorts(t *testing.T) readmePorts {
	t.Helper()
	var ps [4]int
	for i := range ps {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ps[i] = ln.Addr().(*net.TCPAddr).Port
		defer ln.Close()
	}
	return readmePorts{ps[0], ps[1], ps[2], ps[3]}
}

// move rewrites the default ports in a README block; nothing else changes.
func (p readmePorts) move(s string) string {
	return strings.NewReplacer(":8080", ":"+strconv.Itoa(p.http), ":9092", ":"+strconv.Itoa(p.kafka),
		":5432", ":"+strconv.Itoa(p.pg), ":6379", ":"+strconv.Itoa(p.redis)).Replace(s)
}

// env sets the same ports where the README relies on defaults: for the
// servers serve all and dev start. The other commands find those through
// the data directory's record (servers.json), as the reader's do.
func (p readmePorts) env() []string {
	return []string{
		fmt.Sprintf("PROZESS_HTTP_ADDR=127.0.0.1:%d", p.http),
		fmt.Sprintf("PROZESS_BROKER_ADDR=127.0.0.1:%d", p.kafka),
		fmt.Sprintf("PROZESS_EMBEDDED_POSTGRES_ADDR=127.0.0.1:%d", p.pg),
		fmt.Sprintf("PROZESS_EMBEDDED_REDIS_ADDR=127.0.0.1:%d", p.redis),
	}
}

// readmeShell runs README lines in bash, as a reader pastes them into
// terminals: `go run .` is this test's prozess binary, built from the same
// source; a line starting a long-running prozess (serve, dev) runs in the
// background as in a terminal of its own, and the script goes on once that
// process is ready; a new `serve all` stops the previous one first (Ctrl-C,
// as the README says).
//
// curl prints what the reader's does, and records each call in curl-log/
// (NNN.args, NNN.headers, NNN.body): a call that fails, or answers other
// than 2xx, stops the run, unless the README shows that error on the next
// line (# {"error":{"code":"X",...}}: script sets PROZESS_CURL_EXPECT=X
// for it), and then it must answer 4xx with that code.
const readmeShell = `set -euo pipefail
go() { if [ "${1:-}" = run ] && [ "${2:-}" = . ]; then shift 2; "$PROZESS_BIN" "$@"; else command go "$@"; fi; }
curl() {
  mkdir -p "$PWD/curl-log"
  local f status rc=0
  f="$PWD/curl-log/$(printf %03d "$(find "$PWD/curl-log" -name '*.args' | wc -l)")"
  printf '%s\n' "$@" > "$f.args"
  command curl "$@" -D "$f.headers" -o "$f.body" || rc=$?
  cat "$f.body"
  if [ "$rc" != 0 ]; then echo "README curl exited $rc: curl $*" >&2; return 1; fi
  status=$(awk '/^HTTP\//{s=$2} END{print s}' "$f.headers")
  if [ -n "${PROZESS_CURL_EXPECT:-}" ]; then
    case "$status" in 4??) grep -q "\"code\":\"$PROZESS_CURL_EXPECT\"" "$f.body" && return 0 ;; esac
    echo "README curl: HTTP $status, want 4xx with error $PROZESS_CURL_EXPECT: curl $*" >&2; return 1
  fi
  case "$status" in 2??) return 0 ;; esac
  echo "README curl: HTTP $status: curl $*" >&2; return 1
}
n=0
ready() { # ready PID URL-or-logline LOG
  for _ in $(seq 1 600); do
    kill -0 "$1" 2>/dev/null || { echo "process $1 exited at start:"; tail -20 "$3"; exit 1; }
    case "$2" in
      http*) [ "$(command curl -s -o /dev/null -w '%{http_code}' "$2" || true)" = 200 ] && return 0 ;;
      *) grep -q "$2" "$3" && return 0 ;;
    esac
    sleep 0.1
  done
  echo "not ready after 60s: $2"; tail -20 "$3"; exit 1
}
stop() { kill -INT "$1"; for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; echo "process $1 did not stop"; exit 1; }
start() { # start READY-CHECK go run . ARGS...: the binary itself in the background, so $! is prozess
  local check=$1; shift 4
  if [ "$1 ${2:-}" = "serve all" ] && [ -s serve-all.pid ]; then stop "$(cat serve-all.pid)"; fi
  n=$((n+1)); log="$PWD/proc-$n.log"
  "$PROZESS_BIN" "$@" >"$log" 2>&1 & pid=$!
  echo "$pid" >> pids
  if [ "$1 ${2:-}" = "serve all" ]; then echo "$pid" > serve-all.pid; fi
  ready "$pid" "$check" "$log"
}
`

// adminPorts are --admin-addr auto's ports, by the first participant.
var adminPorts = map[string]int{"all": 9464, "api": 9464, "inventory": 9465, "payment": 9466, "delivery": 9467, "status": 9468}

var longRunning = regexp.MustCompile(`^go run \. (serve|dev)\b([^#]*)`)

// script turns README blocks into one bash script, backgrounding the
// long-running commands with the check that says they are ready.
func (p readmePorts) script(t *testing.T, blocks ...string) string {
	t.Helper()
	var out strings.Builder
	out.WriteString(readmeShell)
	for _, b := range blocks {
		lines := strings.Split(p.move(b), "\n")
		for i, line := range lines {
			m := longRunning.FindStringSubmatch(line)
			if m == nil {
				if code := shownError(lines, i); code != "" {
					line = "PROZESS_CURL_EXPECT=" + code + " " + line
				}
				out.WriteString(line + "\n")
				continue
			}
			cmd := strings.TrimSpace(m[0])
			check := "prozess dev:"
			if m[1] == "serve" {
				first := strings.Fields(m[2])[0]
				check = fmt.Sprintf("http://127.0.0.1:%d/readyz", adminPorts[first])
				if first == "all" || first == "api" {
					check = fmt.Sprintf("http://127.0.0.1:%d/products", p.http)
				}
			}
			fmt.Fprintf(&out, "start %q %s\n", check, cmd)
		}
	}
	return out.String()
}

var shownErrorLine = regexp.MustCompile(`^# \{"error":\{"code":"([a-z_]+)"`)

// shownError is the error code the README shows for the curl command that
// starts at lines[i] (on the line after its last), or "".
func shownError(lines []string, i int) string {
	if !strings.HasPrefix(lines[i], "curl ") {
		return ""
	}
	for i < len(lines) && strings.HasSuffix(strings.TrimSpace(lines[i]), "\\") {
		i++
	}
	if i+1 >= len(lines) {
		return ""
	}
	if m := shownErrorLine.FindStringSubmatch(lines[i+1]); m != nil {
		return m[1]
	}
	return ""
}

// curlCall is one curl the README ran (readmeShell's curl-log/).
type curlCall struct {
	args    []string
	status  int
	headers http.Header
	body    string
}

// has reports whether one of the call's arguments contains s.
func (c curlCall) has(s string) bool {
	return slices.ContainsFunc(c.args, func(a string) bool { return strings.Contains(a, s) })
}

// curlCalls reads the calls a README run made, in order.
func curlCalls(t *testing.T, dir string) []curlCall {
	t.Helper()
	args, _ := filepath.Glob(filepath.Join(dir, "curl-log", "*.args"))
	slices.Sort(args)
	var calls []curlCall
	for _, a := range args {
		base := strings.TrimSuffix(a, ".args")
		var c curlCall
		b, err := os.ReadFile(a)
		if err != nil {
			t.Fatal(err)
		}
		c.args = strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		hdr, err := os.ReadFile(base + ".headers")
		if err != nil {
			t.Fatal(err)
		}
		// The last response's head (curl -D writes every one it got).
		heads := strings.Split(strings.TrimSpace(strings.ReplaceAll(string(hdr), "\r\n", "\n")), "\n\n")
		resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(heads[len(heads)-1]+"\n\n")), nil)
		if err != nil {
			t.Fatalf("%s: %v", base+".headers", err)
		}
		resp.Body.Close()
		c.status, c.headers = resp.StatusCode, resp.Header
		body, err := os.ReadFile(base + ".body")
		if err != nil {
			t.Fatal(err)
		}
		c.body = string(body)
		calls = append(calls, c)
	}
	return calls
}

// stock reads a product's stock from a /products answer.
func stock(t *testing.T, products, id string) int64 {
	t.Helper()
	var ps []struct {
		ID    string
		Stock int64
	}
	if err := json.Unmarshal([]byte(products), &ps); err != nil {
		t.Fatalf("a /products answer: %v: %s", err, products)
	}
	for _, p := range ps {
		if p.ID == id {
			return p.Stock
		}
	}
	t.Fatalf("no %s in %s", id, products)
	return 0
}

// runReadme runs script in dir with env, returns its output, and stops (as
// Ctrl-C does) every process it left running when the test ends, checking
// that each exits and that no process (PostgreSQL included) remains that
// works in dir.
func runReadme(t *testing.T, dir, script string, env []string) string {
	t.Helper()
	cmd := exec.Command("bash", "-c", script)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "PROZESS_BIN="+binary), env...)
	t.Cleanup(func() { stopReadmeProcesses(t, dir) })
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("README commands failed: %v\n%s\nlogs:\n%s", err, out, readmeLogs(dir))
	}
	return string(out)
}

func readmeLogs(dir string) string {
	var b strings.Builder
	logs, _ := filepath.Glob(filepath.Join(dir, "proc-*.log"))
	for _, l := range logs {
		f, err := os.Open(l)
		if err != nil {
			continue
		}
		data, _ := io.ReadAll(io.LimitReader(f, 1<<20))
		f.Close()
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		fmt.Fprintf(&b, "== %s (last lines)\n%s\n", filepath.Base(l), strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	return b.String()
}

func stopReadmeProcesses(t *testing.T, dir string) {
	f, err := os.Open(filepath.Join(dir, "pids"))
	if err != nil {
		return
	}
	defer f.Close()
	var pids []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if pid, err := strconv.Atoi(sc.Text()); err == nil && alive(pid) {
			pids = append(pids, pid)
			_ = syscall.Kill(pid, syscall.SIGINT)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				t.Errorf("process %d did not stop within 30s of SIGINT", pid)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if left := processesIn(dir); len(left) > 0 {
		t.Errorf("processes left running in %s after every prozess stopped: %v", dir, left)
	}
}

// alive reports whether pid runs: an orphan that exited may stay a zombie
// until its new parent reaps it, and counts as gone.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	return ok && !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}

// processesIn lists processes whose command line names dir (a PostgreSQL
// server started with -D dir/.prozess/postgres does).
func processesIn(dir string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if strings.Contains(cmd, dir) && alive(pid) {
			out = append(out, cmd)
		}
	}
	return out
}

// reachableTempDir is a fresh directory, removed when the test ends, that
// another user can reach: as root, the embedded PostgreSQL runs as the
// postgres user (t.TempDir's parent is private to this user).
func reachableTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "prozess-readme-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// getDemo GETs url with the demo key and returns the body.
func getDemo(t *testing.T, url string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer pz_kdemo_0000000000000000000000000000000000000000000000000000000000000000")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return string(b)
}

func mustContain(t *testing.T, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("README run printed no %q; it printed:\n%s", w, out)
		}
	}
}

var (
	orderIDs   = regexp.MustCompile(`"order_id":"([0-9a-f-]{36})"`)
	firstOrder = regexp.MustCompile(`"order_id":"([0-9a-f-]{36})","user_id":"u1","status":"([A-Z_]+)"`)
)

// The quick start's `go run . serve all` and every block of the walkthrough,
// run as written in a fresh directory with nothing but the binary: the
// system starts its own PostgreSQL, Redis and broker, answers every
// request as the README says (2xx, but for the two errors it shows), is
// restarted with every payment declined and keeps its orders, and stops
// with Ctrl-C leaving no process behind. What the README says happens
// does: the resubmit is one order, its second answer marked
// Idempotent-Replayed; the webcam order ends CANCELLED with InventoryFailed;
// the declined monitor's stock is back by the README's last /products.
// (`go test ./...`, the quick start's other line, is this very run.)
func TestReadmeWalkthrough(t *testing.T) {
	dir := reachableTempDir(t)
	p := newReadmePorts(t)
	quick := readmeBlocks(t, "## Quick start")[0]
	serveAll := ""
	for _, l := range strings.Split(quick, "\n") {
		if strings.HasPrefix(l, "go run . serve all") {
			serveAll = l + "\n"
		}
	}
	if serveAll == "" {
		t.Fatal("the quick start has no `go run . serve all`")
	}
	walk := readmeBlocks(t, "## Walkthrough")
	if len(walk) < 3 {
		t.Fatalf("want the walkthrough, the declined-payment and the listing blocks, found %d", len(walk))
	}
	// The listing block prints orders again: the checks of the first two
	// blocks' output read only what they printed.
	all := runReadme(t, dir, p.script(t, serveAll, walk[0], walk[1], "echo README-LISTING\n"+walk[2]), p.env())
	out, _, ok := strings.Cut(all, "README-LISTING")
	if !ok {
		t.Fatalf("the listing block did not run:\n%s", all)
	}
	mustContain(t, out, "OrderCreated", "InventoryReserved", "invalid_qty", "unauthorized",
		"PaymentFailed", "InventoryReleased", `"id":"prod-webcam"`)
	// The first order ends as the README says: SHIPPED, or CANCELLED when
	// the simulated payment declined it (15%, at random).
	first := firstOrder.FindStringSubmatch(out)
	if first == nil {
		t.Fatalf("no status of the first order in the output:\n%s", out)
	}
	want := map[string]string{"SHIPPED": "OrderShipped", "CANCELLED": "InventoryReleased"}[first[2]]
	if want == "" || !strings.Contains(out, want) {
		t.Fatalf("first order %s ended %s (trail should show %q):\n%s", first[1], first[2], want, out)
	}
	ids := orderIDs.FindAllStringSubmatch(out, -1)
	if len(ids) < 5 {
		t.Fatalf("found %d order ids in the output, want at least 5:\n%s", len(ids), out)
	}
	// The idempotent resubmit printed one order id twice.
	seen := map[string]int{}
	for _, m := range ids {
		seen[m[1]]++
	}
	twice := false
	for _, n := range seen {
		twice = twice || n >= 2
	}
	if !twice {
		t.Errorf("the Idempotency-Key loop printed two different orders:\n%s", out)
	}
	// The first order survived the restart: the new serve all reads it from
	// the same .prozess/postgres.
	if got := getDemo(t, fmt.Sprintf("http://127.0.0.1:%d/orders/%s", p.http, first[1])); !strings.Contains(got, `"status":"`+first[2]+`"`) {
		t.Errorf("after the restart, order %s reads %s, want it still %s", first[1], got, first[2])
	}
	if _, err := os.Stat(filepath.Join(dir, ".prozess", "postgres", "PG_VERSION")); err != nil {
		t.Errorf("no PostgreSQL data in .prozess/postgres: %v", err)
	}

	calls := curlCalls(t, dir)
	var shown []string
	var resubmits, webcam, products, listings []curlCall
	for _, c := range calls {
		switch {
		case c.status >= 400:
			shown = append(shown, c.body)
		case strings.Contains(c.args[len(c.args)-1], "/orders?"):
			listings = append(listings, c)
		case c.has("Idempotency-Key: checkout-7"):
			resubmits = append(resubmits, c)
		case c.has("prod-webcam"):
			webcam = append(webcam, c)
		case strings.HasSuffix(c.args[len(c.args)-1], "/products"):
			products = append(products, c)
		}
	}
	if len(shown) != 2 || !strings.Contains(shown[0], `"invalid_qty"`) || !strings.Contains(shown[1], `"unauthorized"`) {
		t.Errorf("the calls answered 4xx: %q, want the README's invalid_qty and unauthorized", shown)
	}
	// The resubmit: one order, the second answer marked as a replay.
	if len(resubmits) != 2 {
		t.Fatalf("%d calls with Idempotency-Key checkout-7, want the README's 2", len(resubmits))
	}
	if a, b := orderIDs.FindString(resubmits[0].body), orderIDs.FindString(resubmits[1].body); a == "" || a != b {
		t.Errorf("the resubmitted order: %q then %q, want one order_id", resubmits[0].body, resubmits[1].body)
	}
	if got := resubmits[0].headers.Get("Idempotent-Replayed"); got != "" {
		t.Errorf("the first submit carries Idempotent-Replayed: %q", got)
	}
	if got := resubmits[1].headers.Get("Idempotent-Replayed"); got != "true" {
		t.Errorf("the resubmit carries Idempotent-Replayed: %q, want true", got)
	}
	// The webcam: CANCELLED with InventoryFailed, its stock untouched.
	if len(webcam) != 1 {
		t.Fatalf("%d calls ordering prod-webcam, want 1", len(webcam))
	}
	id := orderIDs.FindStringSubmatch(webcam[0].body)
	if id == nil {
		t.Fatalf("ordering the webcam answered %s", webcam[0].body)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d/orders/%s", p.http, id[1])
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(getDemo(t, base), `"status":"CANCELLED"`); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the webcam order is not CANCELLED 30s on: %s", getDemo(t, base))
		}
	}
	if evs := getDemo(t, base+"/events"); !strings.Contains(evs, `"InventoryFailed"`) || strings.Contains(evs, `"InventoryReserved"`) {
		t.Errorf("the webcam order's trail: %s, want InventoryFailed and no reservation", evs)
	}
	// The listing: two pages of two, newest first, none twice; then the
	// shipped orders only.
	if len(listings) != 3 {
		t.Fatalf("%d GET /orders? calls, want the README's 3", len(listings))
	}
	var listed []string
	for i, c := range listings[:2] {
		var page api.ListResponse
		if err := json.Unmarshal([]byte(c.body), &page); err != nil || len(page.Orders) != 2 || i == 0 && page.NextCursor == "" {
			t.Fatalf("listing page %d: %s (%v)", i+1, c.body, err)
		}
		for _, o := range page.Orders {
			listed = append(listed, o.OrderID.String())
		}
	}
	if !slices.IsSortedFunc(listed, func(a, b string) int { return strings.Compare(b, a) }) || len(slices.Compact(slices.Clone(listed))) != 4 {
		t.Errorf("the two pages list %v: want four orders, newest first", listed)
	}
	var shipped api.ListResponse
	if err := json.Unmarshal([]byte(listings[2].body), &shipped); err != nil {
		t.Fatalf("status=SHIPPED: %s (%v)", listings[2].body, err)
	}
	for _, o := range shipped.Orders {
		if o.Status != event.StatusShipped {
			t.Errorf("status=SHIPPED lists a %s order", o.Status)
		}
	}
	// The declined monitor: the products the second block prints before
	// and after show the same stock, the webcam's too.
	if len(products) != 3 {
		t.Fatalf("%d calls of /products, want the README's 3", len(products))
	}
	before, after := products[1].body, products[2].body
	if b, a := stock(t, before, "prod-monitor"), stock(t, after, "prod-monitor"); b < 1 || a != b {
		t.Errorf("prod-monitor's stock %d before the declined order, %d after: want it back", b, a)
	}
	if b, a := stock(t, products[0].body, "prod-webcam"), stock(t, after, "prod-webcam"); a != b {
		t.Errorf("prod-webcam's stock %d, then %d after an order refused for want of it", b, a)
	}
}

// The separate-processes block as written: `prozess dev` and one process per
// participant, each on its own admin port; the order it places goes through
// all four processes.
func TestReadmeSeparateProcesses(t *testing.T) {
	dir := reachableTempDir(t)
	p := newReadmePorts(t)
	block := readmeBlocks(t, "### Participants in separate processes")[0]
	out := runReadme(t, dir, p.script(t, block), p.env())
	ids := orderIDs.FindAllStringSubmatch(out, -1)
	if len(ids) != 1 {
		t.Fatalf("want the one order the block places, output:\n%s", out)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/orders/%s", p.http, ids[0][1])
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := getDemo(t, url)
		if strings.Contains(got, `"status":"SHIPPED"`) || strings.Contains(got, `"status":"CANCELLED"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("order not finished after 30s: %s\nlogs:\n%s", got, readmeLogs(dir))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for name, port := range map[string]int{"api": 9464, "inventory": 9465, "payment": 9466, "delivery": 9467} {
		res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", port))
		if err != nil {
			t.Fatalf("%s's admin port %d: %v", name, port, err)
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			t.Errorf("%s's /readyz on %d: %d", name, port, res.StatusCode)
		}
	}
}
