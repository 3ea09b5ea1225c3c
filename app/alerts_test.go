package app_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/event"
)

const (
	alertRules     = "../deploy/prometheus/prozess-alerts.yml"
	alertRuleTests = "../deploy/prometheus/prozess-alerts.test.yml"
	dashboard      = "../deploy/grafana/prozess.json"
	runbook        = "../docs/RUNBOOK.md"
)

// prometheusTool returns the path of a Prometheus binary (prometheus or
// promtool, Debian's package has both). Without it the test skips, unless
// PROZESS_REQUIRE_PROMETHEUS=1 (CI), where it fails.
func prometheusTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s is not installed (apt-get install prometheus, or .ci/services prometheus)", name)
	if os.Getenv("PROZESS_REQUIRE_PROMETHEUS") == "1" {
		t.Fatal(msg + "; PROZESS_REQUIRE_PROMETHEUS=1 requires it")
	}
	t.Skip(msg)
	return ""
}

// The alerting rules are valid and their promtool unit tests pass: each
// alert is quiet while healthy and fires once its condition held for its
// for:.
func TestAlertRulesUnit(t *testing.T) {
	t.Parallel()
	promtool := prometheusTool(t, "promtool")
	for _, args := range [][]string{{"check", "rules", alertRules}, {"test", "rules", alertRuleTests}} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// ruleExprs returns each alert's name and expression from the rules file
// (every expr is on one line there).
func ruleExprs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(alertRules)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*- alert: (\S+)\n\s*expr: (.+)$`).FindAllStringSubmatch(string(b), -1)
	if n := strings.Count(string(b), "- alert:"); len(m) != n || n == 0 {
		t.Fatalf("found %d one-line exprs for %d alerts in %s", len(m), n, alertRules)
	}
	exprs := map[string]string{}
	for _, a := range m {
		exprs[a[1]] = a[2]
	}
	return exprs
}

// dashboardExprs returns every query of the Grafana dashboard, by panel
// title and ref id.
func dashboardExprs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(dashboard)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				RefID string `json:"refId"`
				Expr  string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboard, err)
	}
	exprs := map[string]string{}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			if tg.Expr == "" {
				t.Errorf("panel %q target %s has no expression", p.Title, tg.RefID)
			}
			exprs[p.Title+"/"+tg.RefID] = tg.Expr
		}
	}
	if len(exprs) < 10 {
		t.Fatalf("only %d expressions in %s", len(exprs), dashboard)
	}
	return exprs
}

var (
	promStrings  = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	promMatchers = regexp.MustCompile(`\{[^}]*\}|\[[^\]]*\]`)
	promGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promTokens   = regexp.MustCompile(`[0-9][0-9.eE+a-z]*|\$\w+|([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?`)
	promKeywords = []string{"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan"}
)

// metricNames returns the metric names a PromQL expression selects: what
// is left, once strings, label matchers, ranges and grouping lists are
// dropped, that is neither a number, a function call nor a keyword.
func metricNames(expr string) []string {
	expr = promStrings.ReplaceAllString(expr, `""`)
	expr = promMatchers.ReplaceAllString(expr, " ")
	expr = promGrouping.ReplaceAllString(expr, " ")
	var names []string
	for _, m := range promTokens.FindAllStringSubmatch(expr, -1) {
		if m[1] != "" && m[2] == "" && !slices.Contains(promKeywords, strings.ToLower(m[1])) {
			names = append(names, m[1])
		}
	}
	return names
}

func TestMetricNames(t *testing.T) {
	t.Parallel()
	got := metricNames(`histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{code=~"5..", x="y}"}[$__rate_interval]))) ` +
		`/ on (route) group_left (x) b offset 5m > bool 1e3 or absent(c) unless sum(d) without (e)`)
	if want := []string{"a_bucket", "b", "c", "d"}; !slices.Equal(got, want) {
		t.Errorf("metricNames: %v, want %v", got, want)
	}
}

// exported returns the metric names on /metrics.
func exported(metrics string) map[string]bool {
	names := map[string]bool{}
	for _, line := range strings.Split(metrics, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		names[strings.FieldsFunc(line, func(r rune) bool { return r == '{' || r == ' ' })[0]] = true
	}
	return names
}

// Every expression of the dashboard and of the alerting rules names only
// metrics a running system exports (up is Prometheus's own), every one of
// them parses, and every alert has its section in the runbook.
func TestDashboardAndAlertsNameExportedMetrics(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg)
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	if o := r.await(t, id, 30*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("order %s", o.Status)
	}

	exprs := dashboardExprs(t)
	alerts := ruleExprs(t)
	want := map[string][]string{} // metric -> where it is used
	for where, x := range exprs {
		names := metricNames(x)
		if len(names) == 0 {
			t.Errorf("dashboard %s: no metric in %s", where, x)
		}
		for _, n := range names {
			want[n] = append(want[n], "dashboard "+where)
		}
	}
	for alert, x := range alerts {
		for _, n := range metricNames(x) {
			want[n] = append(want[n], "alert "+alert)
		}
	}
	delete(want, "up") // Prometheus's own, per target
	// Lag and the state gauges are read every few seconds: wait for a
	// scrape that has them all.
	var missing []string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		have := exported(scrape(t, "http://"+r.sys.AdminAddr()+"/metrics"))
		missing = missing[:0]
		for n := range want {
			if !have[n] {
				missing = append(missing, n)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
	}
	slices.Sort(missing)
	for _, n := range missing {
		t.Errorf("%s is not on /metrics, used by %v", n, want[n])
	}

	b, err := os.ReadFile(runbook)
	if err != nil {
		t.Fatal(err)
	}
	for alert := range alerts {
		if !strings.Contains(string(b), "\n## "+alert+"\n") {
			t.Errorf("%s has no section (## %s) in docs/RUNBOOK.md", alert, alert)
		}
	}

	// Every dashboard expression parses: promtool checks them as recording
	// rules (Grafana's $__rate_interval is a range it fills in).
	promtool := prometheusTool(t, "promtool")
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	i := 0
	for where, x := range exprs {
		i++
		x = strings.NewReplacer("$__rate_interval", "1m", "$__interval", "1m").Replace(x)
		q, _ := json.Marshal(x)
		fmt.Fprintf(&rules, "      # %s\n      - record: dashboard:expr_%d\n        expr: %s\n", where, i, q)
	}
	f := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	if err := os.WriteFile(f, []byte(rules.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", f).CombinedOutput(); err != nil {
		t.Errorf("dashboard expressions do not all parse: %v\n%s", err, out)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// prometheusServer is a real Prometheus scraping the test's systems.
type prometheusServer struct {
	url string
}

// startPrometheus runs /usr/bin/prometheus with rules, scraping targets
// every second and evaluating every second, until the test ends.
func startPrometheus(t *testing.T, rules string, targets ...string) *prometheusServer {
	t.Helper()
	bin := prometheusTool(t, "prometheus")
	dir := t.TempDir()
	ruleFile := filepath.Join(dir, "rules.yml")
	if err := os.WriteFile(ruleFile, []byte(rules), 0o600); err != nil {
		t.Fatal(err)
	}
	quoted := make([]string, len(targets))
	for i, tg := range targets {
		quoted[i] = fmt.Sprintf("%q", tg)
	}
	config := fmt.Sprintf(`global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}
rule_files: [%q]
scrape_configs:
  - job_name: prozess
    static_configs: [{targets: [%s]}]
`, ruleFile, strings.Join(quoted, ", "))
	configFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(configFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	var out syncBuffer
	cmd := exec.Command(bin, "--config.file="+configFile, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting prometheus: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("prometheus output:\n%s", out.String())
		}
	})
	p := &prometheusServer{url: "http://" + addr}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		resp, err := http.Get(p.url + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-exited:
			t.Fatalf("prometheus exited:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready within 60s (%v):\n%s", err, out.String())
		}
	}
}

// alertState is the alert's state in Prometheus: "pending", "firing", or
// "" when it is not active.
func (p *prometheusServer) alertState(t *testing.T, name string) string {
	t.Helper()
	var body struct {
		Data struct {
			Alerts []struct {
				Labels map[string]string `json:"labels"`
				State  string            `json:"state"`
			} `json:"alerts"`
		} `json:"data"`
	}
	p.get(t, "/api/v1/alerts", &body)
	state := ""
	for _, a := range body.Data.Alerts {
		if a.Labels["alertname"] == name && (state == "" || a.State == "firing") {
			state = a.State
		}
	}
	return state
}

// query returns the values of an instant query's samples.
func (p *prometheusServer) query(t *testing.T, q string) []string {
	t.Helper()
	var body struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	p.get(t, "/api/v1/query?query="+url.QueryEscape(q), &body)
	var vs []string
	for _, r := range body.Data.Result {
		vs = append(vs, fmt.Sprint(r.Value[1]))
	}
	return vs
}

func (p *prometheusServer) get(t *testing.T, path string, v any) {
	t.Helper()
	resp, err := http.Get(p.url + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d", path, resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
}

// The shipped alerting rules, with the stall threshold and every for:
// shortened (so the test takes seconds, not minutes), loaded into a real
// Prometheus that scrapes a running system: with the payment participant
// stopped, orders wait and ProzessSagaStalled fires; with payment started
// again, the orders ship and the alert resolves.
func TestSagaStalledAlertFiresAndResolves(t *testing.T) {
	prometheusTool(t, "prometheus")
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	rest := e.start(cfg, "api", "inventory", "delivery", "status")
	payCfg := cfg
	payCfg.AdminAddr = freeAddr(t) // the same on restart: Prometheus scrapes it
	pay := e.start(payCfg, "payment")

	b, err := os.ReadFile(alertRules)
	if err != nil {
		t.Fatal(err)
	}
	const stalled = "max(prozess_saga_oldest_unpaid_age_seconds) > 120"
	if !bytes.Contains(b, []byte(stalled)) {
		t.Fatalf("%s has no %q; update this test with the rule", alertRules, stalled)
	}
	rules := strings.Replace(string(b), stalled, "max(prozess_saga_oldest_unpaid_age_seconds) > 3", 1)
	rules = regexp.MustCompile(`(?m)^(\s+for:) \S+$`).ReplaceAllString(rules, "$1 5s")
	prom := startPrometheus(t, rules, rest.sys.AdminAddr(), payCfg.AdminAddr)

	// Healthy: an order ships, both targets are up, the alert is quiet.
	id := rest.order(t, "u1", "", mouse(1)).OrderID.String()
	if o := rest.await(t, id, 30*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("order %s", o.Status)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		if up := prom.query(t, `sum(up{job="prozess"})`); slices.Equal(up, []string{"2"}) &&
			len(prom.query(t, "prozess_saga_oldest_unpaid_age_seconds")) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus has not scraped both systems within 30s")
		}
	}
	// A slow first order on a loaded machine may make it pending for a
	// moment; it must never fire, and must be quiet before payment stops.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		s := prom.alertState(t, "ProzessSagaStalled")
		if s == "firing" {
			t.Fatalf("ProzessSagaStalled fires while orders ship")
		}
		if s == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ProzessSagaStalled still %s 30s after the order shipped", s)
		}
	}

	// Payment stops; orders wait for it.
	if err := pay.shutdown(t); err != nil {
		t.Fatalf("stopping payment: %v", err)
	}
	var waiting []string
	for range 3 {
		waiting = append(waiting, rest.order(t, "u1", "", mouse(1)).OrderID.String())
	}
	stoppedAt := time.Now()
	var pendingAt time.Time
	for deadline := stoppedAt.Add(90 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		s := prom.alertState(t, "ProzessSagaStalled")
		if s == "pending" && pendingAt.IsZero() {
			pendingAt = time.Now()
		}
		if s == "firing" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ProzessSagaStalled not firing 90s after payment stopped (state %q)", s)
		}
	}
	t.Logf("ProzessSagaStalled firing %s after payment stopped (pending after %s)",
		time.Since(stoppedAt).Round(100*time.Millisecond), pendingAt.Sub(stoppedAt).Round(100*time.Millisecond))

	// Payment is back: the orders ship and the alert resolves.
	e.start(payCfg, "payment")
	for _, id := range waiting {
		if o := rest.await(t, id, 60*time.Second); o.Status != event.StatusShipped {
			t.Fatalf("order %s %s after payment came back", id, o.Status)
		}
	}
	back := time.Now()
	for deadline := back.Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		s := prom.alertState(t, "ProzessSagaStalled")
		if s == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ProzessSagaStalled still %s 60s after the waiting orders shipped", s)
		}
	}
	t.Logf("ProzessSagaStalled resolved %s after the waiting orders shipped", time.Since(back).Round(100*time.Millisecond))
}
