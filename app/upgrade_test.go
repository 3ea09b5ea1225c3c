package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/app/saga/sagatest"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// newer rewrites a record as a newer producer of the same major would write
// it: a higher minor version and a field this build does not know.
func newer(t *testing.T, r *kgo.Record) *kgo.Record {
	t.Helper()
	var payload map[string]any
	if err := json.Unmarshal(r.Value, &payload); err != nil {
		t.Fatal(err)
	}
	payload["added_in_1_3"] = map[string]any{"retry_after_s": 30}
	b, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	r.Value = b
	for i, h := range r.Headers {
		if h.Key == "ce_schemaversion" {
			r.Headers[i].Value = []byte("1.3")
		}
	}
	return r
}

// A rolling upgrade: a newer payment (schema 1.3, an extra field) declines
// an order; the older inventory and status read it, the stock comes back
// and the order is cancelled. Before, the exact version and unknown fields
// were refused and the stock was never released. A newer OrderCreated (an
// order another api version wrote) is reserved by inventory and recorded
// by status, a newer InventoryReserved charged by payment, a newer
// PaymentCompleted shipped by delivery; nothing is dead-lettered.
func TestEventsFromANewerProducerAreApplied(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()                               // a partial serve uses the brokers it is given
	r := e.start(cfg, "api", "inventory", "delivery", "status") // payment is "upgraded": the test plays it
	initial := r.stock(t)
	o := r.order(t, "u1", "", mouse(2))
	r.awaitStatus(t, o.OrderID.String(), event.StatusReserved, 20*time.Second)
	declined, err := event.New(event.PaymentFailed, o.OrderID, "payment", event.Failed{Reason: "card declined"})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), newer(t, declined.Record(cfg.Topic))).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if got := r.await(t, o.OrderID.String(), 20*time.Second); got.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED by the newer PaymentFailed", got.Status)
	}
	r.awaitTrail(t, o.OrderID.String(), event.OrderCreated, event.InventoryReserved, event.PaymentFailed, event.InventoryReleased)
	if got := r.stock(t); got["prod-mouse"] != initial["prod-mouse"] {
		t.Fatalf("prod-mouse stock %d, want %d back", got["prod-mouse"], initial["prod-mouse"])
	}

	second := e.insertOrder()
	created, err := event.New(event.OrderCreated, second, "api", event.Created{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(t.Context(), newer(t, created.Record(cfg.Topic))).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if got := r.awaitStatus(t, second.String(), event.StatusReserved, 20*time.Second); got.Status != event.StatusReserved {
		t.Fatalf("newer OrderCreated: order is %s, want INVENTORY_RESERVED", got.Status)
	}
	// Payment reads a newer InventoryReserved and delivery a newer
	// PaymentCompleted: two more orders, each picked up mid-saga.
	third, fourth := e.insertOrder(), e.insertOrder()
	reserved, err := event.New(event.InventoryReserved, third, "inventory", event.Reserved{UserID: "u1", Items: []event.Item{mouse(1)}, AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	paid, err := event.New(event.PaymentCompleted, fourth, "payment", event.Paid{PaymentID: uuid.New(), AmountCents: 2999})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(t.Context(), newer(t, reserved.Record(cfg.Topic)), newer(t, paid.Record(cfg.Topic))).FirstErr(); err != nil {
		t.Fatal(err)
	}
	cfg.PaymentDeclineRate = 0
	e.start(cfg, "payment") // the older payment, this time
	for _, id := range []uuid.UUID{third, fourth} {
		if got := r.await(t, id.String(), 20*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s, picked up from a newer event, ended %s", id, got.Status)
		}
	}
	dls, err := saga.ReadDeadLetters(t.Context(), saga.Conn{Brokers: r.sys.Brokers()}, cfg.DLQTopic())
	if err != nil || len(dls) != 0 {
		t.Fatalf("%d dead letters (%v), want none", len(dls), err)
	}
}

// previousRelease builds the prozess of the commit before the one that last
// changed the newest migration (HEAD when that migration is not committed
// yet), from
// git, into a directory of the test's own, and returns the executable, the
// commit and the migration the old build lacks. Go's build cache makes
// every build after the first a matter of seconds.
func previousRelease(t *testing.T) (exe, commit, migration string) {
	t.Helper()
	git := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("git", args...)
		cmd.Dir = ".."
		out, err := cmd.Output()
		if err != nil {
			var stderr string
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = string(ee.Stderr)
			}
			t.Fatalf("git %s: %v %s (the rolling-upgrade test builds the previous release from git: it needs a checkout with its history)",
				strings.Join(args, " "), err, stderr)
		}
		return strings.TrimSpace(string(out))
	}
	files, err := os.ReadDir("../schema/migrations")
	if err != nil {
		t.Fatal(err)
	}
	migration = "schema/migrations/" + files[len(files)-1].Name()
	commit = git("rev-parse", "HEAD")
	if exec.Command("git", "-C", "..", "cat-file", "-e", "HEAD:"+migration).Run() == nil {
		commit = git("rev-parse", git("log", "-1", "--format=%H", "--", migration)+"^")
	}
	if exec.Command("git", "-C", "..", "cat-file", "-e", commit+":"+migration).Run() == nil {
		t.Fatalf("the previous release %s already has %s", commit, migration)
	}
	dir := t.TempDir()
	tarball := filepath.Join(dir, "src.tar")
	git("archive", "--format=tar", "-o", tarball, commit)
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("tar", "-xf", tarball, "-C", src).CombinedOutput(); err != nil {
		t.Fatalf("unpacking %s: %v\n%s", commit, err, out)
	}
	exe = filepath.Join(dir, "prozess-old")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", exe, ".")
	build.Dir = src
	build.Env = append(os.Environ(), "GOWORK=off")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the previous release %s: %v\n%s", commit, err, out)
	}
	return exe, commit, migration
}

// emptyDatabase creates a database with no schema at all (the previous
// release migrates it to its own), dropped when the test ends.
func emptyDatabase(t *testing.T) string {
	t.Helper()
	ctx := t.Context()
	admin, err := pgx.Connect(ctx, schematest.AdminURL(t))
	if err != nil {
		t.Fatalf("cannot reach PostgreSQL at %s: %v", schematest.AdminURL(t), err)
	}
	defer admin.Close(ctx)
	name := schematest.Name("prozess_test_")
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("creating test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, schematest.AdminURL(t))
		if err != nil {
			t.Errorf("dropping test database %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("dropping test database %s: %v", name, err)
		}
	})
	cfg, err := pgx.ParseConfig(schematest.AdminURL(t))
	if err != nil {
		t.Fatal(err)
	}
	u := &url.URL{Scheme: "postgres", Host: net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))), Path: "/" + name, RawQuery: "sslmode=disable"}
	u.User = url.User(cfg.User)
	if cfg.Password != "" {
		u.User = url.UserPassword(cfg.User, cfg.Password)
	}
	return u.String()
}

// A rolling upgrade with a migration: the previous release (built from
// git) serves alone, on the schema it migrated itself; this build starts
// beside it on the same database, topic and consumer groups and applies
// the newest migration while the old one serves; both take orders and
// share the partitions; an old instance (re)starts on the migrated schema;
// then the old ones stop and this build serves alone. Orders flow
// throughout, through both APIs: every accepted order ships once, stock
// matches, nothing is dead-lettered or parked, and `prozess check` is
// clean.
func TestRollingUpgradeWithAMigrationWhileTheOldServes(t *testing.T) {
	t.Parallel()
	exe, commit, migration := previousRelease(t)
	t.Logf("previous release %.12s, without %s", commit, migration)
	e := envOn(t, emptyDatabase(t))
	if sagatest.Real() {
		k := sagatest.New(t)
		e.kafka = &k
	}
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	env := []string{
		"PROZESS_DATABASE_URL=" + e.dbURL,
		"PROZESS_REDIS_ADDR=" + cfg.RedisAddr, "PROZESS_REDIS_PREFIX=" + e.prefix,
		"PROZESS_KAFKA_BROKERS=" + strings.Join(cfg.KafkaBrokers, ","),
		"PROZESS_TOPIC=" + cfg.Topic, "PROZESS_GROUP_PREFIX=" + cfg.GroupPrefix,
		"PROZESS_PARTITIONS=" + strconv.Itoa(int(cfg.Partitions)),
		"PROZESS_LOG_FORMAT=json", "PROZESS_RATE_LIMIT=0", "PROZESS_ADMIN_ADDR=127.0.0.1:0",
		"PROZESS_PAYMENT_DECLINE_RATE=0", "PROZESS_DATA_DIR=" + t.TempDir(),
	}
	version := func() int64 { return e.count(`SELECT max(version_id) FROM goose_db_version WHERE is_applied`) }
	newest, err := strconv.ParseInt(strings.SplitN(filepath.Base(migration), "_", 2)[0], 10, 64)
	if err != nil {
		t.Fatal(err)
	}

	old := spawnExe(t, exe, env, "serve", "api", "inventory", "payment", "delivery", "status", "--http-addr", "127.0.0.1:0")
	oldAPI := &running{e: e, url: "http://" + old.ready(t)["http"].(string)}
	if v := version(); v != newest-1 {
		t.Fatalf("the previous release migrated to %d, want %d", v, newest-1)
	}
	initial := oldAPI.stock(t)

	// Load through whichever APIs serve, from start to end.
	var mu sync.Mutex
	apis := []*running{oldAPI}
	var placed, refused []string
	key := e.keyFor("u1")
	stop := make(chan struct{})
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			mu.Lock()
			r := apis[i%len(apis)]
			mu.Unlock()
			id, err := tryOrder(r, key)
			mu.Lock()
			if err != nil {
				refused = append(refused, err.Error())
			} else {
				placed = append(placed, id)
			}
			mu.Unlock()
		}
	}()
	setAPIs := func(rs ...*running) {
		mu.Lock()
		apis = rs
		mu.Unlock()
	}
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(placed)
	}
	time.Sleep(2 * time.Second)

	// This build starts beside the old one and migrates while it serves.
	r := e.start(cfg)
	if v := version(); v != newest {
		t.Fatalf("schema at %d after this build started, want %d", v, newest)
	}
	setAPIs(oldAPI, r)
	// An old instance (a restart, a late replica) starts on the new schema.
	oldAgain := spawnExe(t, exe, env, "serve", "inventory", "payment", "--http-addr", "127.0.0.1:0")
	oldAgain.ready(t)
	before := count()
	time.Sleep(4 * time.Second)
	if n := count() - before; n < 10 {
		t.Fatalf("only %d orders placed while old and new served side by side", n)
	}
	// The old API's orders after the migration end too.
	afterMigration := oldAPI.order(t, "u1", "", mouse(1)).OrderID.String()
	if got := r.await(t, afterMigration, 60*time.Second); got.Status != event.StatusShipped {
		t.Fatalf("an order the old api took after the migration ended %s", got.Status)
	}

	// The old ones stop: the upgrade is done.
	setAPIs(r)
	time.Sleep(200 * time.Millisecond) // a POST in flight to the old api ends first
	old.stop(t)
	oldAgain.stop(t)
	time.Sleep(2 * time.Second)
	close(stop)
	<-loadDone

	mu.Lock()
	ids := append(slices.Clone(placed), afterMigration)
	if len(refused) > 0 {
		t.Errorf("%d POSTs refused during the upgrade, the first: %s", len(refused), refused[0])
	}
	mu.Unlock()
	for _, id := range ids {
		if got := r.await(t, id, 60*time.Second); got.Status != event.StatusShipped {
			t.Fatalf("order %s ended %s, want SHIPPED", id, got.Status)
		}
	}
	e.awaitQuiet(30 * time.Second)
	e.assertExactlyOnce(initial, r.stock(t))
	for sql, want := range map[string]int64{
		`SELECT count(*) FROM shipments`:                           int64(len(ids)),
		`SELECT count(*) FROM dead_letters`:                        0,
		`SELECT count(*) FROM parked`:                              0,
		`SELECT count(*) FROM orders WHERE expired_at IS NOT NULL`: 0,
	} {
		if n := e.count(sql); n != want {
			t.Errorf("%s: %d, want %d", sql, n, want)
		}
	}
	e.checkClean(t, cfg.KafkaBrokers)
	t.Logf("%d orders through a rolling upgrade from %.12s", len(ids), commit)
}

// tryOrder places one order of a mouse through r's API and returns its id;
// unlike running.order it may run off the test's goroutine.
func tryOrder(r *running, key string) (string, error) {
	b, _ := json.Marshal(api.CreateRequest{UserID: "u1", Items: []event.Item{mouse(1)}})
	req, err := http.NewRequest(http.MethodPost, r.url+"/orders", bytes.NewReader(b))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("POST %s/orders: %w", r.url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		return "", fmt.Errorf("POST %s/orders: %d %s", r.url, resp.StatusCode, body)
	}
	var out api.CreateResponse
	if err := json.Unmarshal(body, &out); err != nil {
		return "", err
	}
	return out.OrderID.String(), nil
}
