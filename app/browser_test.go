package app_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/schema/schematest"
)

// browser starts a headless Chromium for the test, or skips when there is
// none, unless PROZESS_REQUIRE_BROWSER is set (CI sets it), which makes a
// missing browser a failure.
func browser(t *testing.T) context.Context {
	t.Helper()
	path := os.Getenv("PROZESS_CHROMIUM")
	if path == "" {
		for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
			if p, err := exec.LookPath(name); err == nil {
				path = p
				break
			}
		}
	}
	if path == "" {
		if os.Getenv("PROZESS_REQUIRE_BROWSER") != "" {
			t.Fatal("no Chromium found (apt-get install chromium, or set PROZESS_CHROMIUM) and PROZESS_REQUIRE_BROWSER is set")
		}
		t.Skip("no Chromium found: apt-get install chromium to run the browser test")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.WindowSize(1440, 900),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(t.Context(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	return ctx
}

// The live page in a real browser: place an order with the page's form and
// watch its card reach SHIPPED as the events stream in, stock go down, the
// event list fill; with an admin key, a dead letter appears.
func TestLivePageInBrowser(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	r := e.start(e.config())
	// The first action starts the browser, which lives as long as ctx: it
	// gets no timeout of its own (chromedp's rule); the later ones do.
	if err := chromedp.Do(ctx, chromedp.Navigate(r.url+"/live")); err != nil {
		t.Fatalf("opening the page: %v", err)
	}
	tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	mouseStock := chromedp.CSS(`#stock tr[data-product-id="prod-mouse"] td.n`)
	if err := chromedp.Do(tctx, chromedp.WaitVisible(mouseStock)); err != nil {
		t.Fatalf("stock table: %v", err)
	}
	before, err := chromedp.Run(tctx, chromedp.Text(mouseStock))
	if err != nil {
		t.Fatal(err)
	}
	err = chromedp.Do(tctx,
		chromedp.SetValue(chromedp.CSS(`#key`), e.keyFor("u1")),
		chromedp.Click(chromedp.CSS(`#key-form button`)),
		chromedp.WaitVisible(chromedp.CSS(`#conn.on`)),
		chromedp.SetValue(chromedp.CSS(`#product`), "prod-mouse"),
		chromedp.SetValue(chromedp.CSS(`#qty`), "2"),
	)
	if err != nil {
		t.Fatalf("filling in the order form: %v", err)
	}
	id := placeInPage(t, tctx)
	// The order really exists, and the page shows it SHIPPED once the
	// saga is done.
	if o := r.await(t, id, 20*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("order ended %s", o.Status)
	}
	err = chromedp.Do(tctx,
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`.col[data-status="SHIPPED"] .card[data-order-id="%s"]`, id))),
		discard(chromedp.Poll[bool](fmt.Sprintf(
			`document.querySelector('#stock tr[data-product-id="prod-mouse"] td.n').textContent === "%d"`, atoi(t, before)-2))),
	)
	if err != nil {
		t.Fatalf("watching the order reach SHIPPED and the stock go down: %v", err)
	}
	if last, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(`#events li:first-child span`))); err != nil || last != string(event.OrderShipped) {
		t.Errorf("latest event on the page is %q (%v)", last, err)
	}
	cards, err := chromedp.Run(tctx, chromedp.Evaluate[int](fmt.Sprintf(`document.querySelectorAll('.card[data-order-id="%s"]').length`, id)))
	if err != nil || cards != 1 {
		t.Errorf("the order has %d cards on the board (%v), want exactly one", cards, err)
	}

	// An admin sees dead letters: a record no participant can read is
	// dead-lettered by the status writer and shows up on the page.
	err = chromedp.Do(tctx,
		chromedp.SetValue(chromedp.CSS(`#key`), e.keyFor("admin")),
		chromedp.Click(chromedp.CSS(`#key-form button`)),
		discard(chromedp.Poll[bool](`document.querySelector('#dlq-note').textContent === ""`)),
	)
	if err != nil {
		t.Fatalf("reconnecting as admin: %v", err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	poison := &kgo.Record{Topic: "order-events", Key: []byte(id), Value: []byte("{not json"), Headers: []kgo.RecordHeader{
		{Key: "ce_specversion", Value: []byte("1.0")}, {Key: "ce_type", Value: []byte("OrderShipped")}}}
	if err := cl.ProduceSync(tctx, poison).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if err := chromedp.Do(tctx, chromedp.WaitVisible(chromedp.CSS(`#dlq li`))); err != nil {
		t.Fatalf("dead letter not shown: %v", err)
	}
	if dl, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(`#dlq li span`))); err != nil || !strings.Contains(dl, "status:") {
		t.Errorf("dead letter line %q (%v) does not name the participant", dl, err)
	}

	if path := os.Getenv("PROZESS_SCREENSHOT"); path != "" {
		screenshot(t, tctx, r, path)
	}
}

// placeInPage presses Place order and returns the id the page shows.
func placeInPage(t *testing.T, ctx context.Context) string {
	t.Helper()
	err := chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS(`#place`)),
		chromedp.WaitVisible(chromedp.CSS(`#order-result[data-order-id]`)),
	)
	if err != nil {
		t.Fatalf("placing an order in the page: %v", err)
	}
	res, err := chromedp.Run(ctx, chromedp.AttributeValue(chromedp.CSS(`#order-result`), "data-order-id"))
	if err != nil || !res.Exists {
		t.Fatalf("no order id on the page: %v", err)
	}
	return res.Value
}

// discard runs a that returns a value as a step of chromedp.Do.
func discard[T any](a chromedp.Action[T]) chromedp.Action[chromedp.Void] {
	return func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		_, err := a(ctx, tg)
		return chromedp.Void{}, err
	}
}

// screenshot keeps orders flowing (some out of stock) and saves the page,
// for the README: PROZESS_SCREENSHOT=docs/live.png go test -run TestLivePageInBrowser ./app
func screenshot(t *testing.T, ctx context.Context, r *running, path string) {
	products := []string{"prod-mouse", "prod-keyboard", "prod-headset", "prod-monitor", "prod-webcam"}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(60 * time.Millisecond):
				r.order(t, "u1", "", event.Item{ProductID: products[rand.N(len(products))], Qty: 1 + rand.N(3)})
			}
		}
	}()
	err := chromedp.Do(ctx,
		chromedp.SetValue(chromedp.CSS(`#key`), r.e.keyFor("admin")),
		chromedp.Click(chromedp.CSS(`#key-form button`)),
		chromedp.Sleep(4*time.Second),
	)
	var png []byte
	if err == nil {
		png, err = chromedp.Run(ctx, chromedp.CaptureScreenshot())
	}
	close(stop)
	<-done
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot written to %s", path)
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	var n int
	if _, err := fmt.Sscan(strings.TrimSpace(s), &n); err != nil {
		t.Fatalf("not a number: %q", s)
	}
	return n
}

// With authentication off (serve --no-auth) the page needs no key: it
// connects by itself and places orders as user "web".
func TestLivePageWithoutAuth(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	cfg := e.config()
	cfg.NoAuth = true
	r := e.start(cfg)
	if err := chromedp.Do(ctx, chromedp.Navigate(r.url+"/live")); err != nil {
		t.Fatalf("opening the page: %v", err)
	}
	tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	err := chromedp.Do(tctx,
		chromedp.WaitVisible(chromedp.CSS(`#conn.on`)),
		discard(chromedp.Poll[bool](`document.querySelectorAll('#product option').length > 0`)),
	)
	if err != nil {
		t.Fatalf("the page did not connect by itself: %v", err)
	}
	id := placeInPage(t, tctx)
	if err := chromedp.Do(tctx, chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`.col[data-status="SHIPPED"] .card[data-order-id="%s"]`, id)))); err != nil {
		t.Fatalf("order never shown SHIPPED: %v", err)
	}
	if o := r.await(t, id, 15*time.Second); o.UserID != "web" {
		t.Errorf("order placed as %q, want web", o.UserID)
	}
}

// The live page's re-drive button: a bad deploy makes delivery dead-letter
// an order's PaymentCompleted; an admin sees the dead letter with its order,
// participant and reason, the cause is fixed, one click re-drives it, and
// the order ships. The order's trail records who re-drove it.
func TestLivePageReDrivesADeadLetter(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	r := e.start(e.config())
	schematest.Exec(t, e.pool, `ALTER TABLE shipments ADD CONSTRAINT bad_deploy CHECK (carrier <> 'prozess-post')`)
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	d := r.awaitOrderDeadLetter(t, id, "delivery")
	schematest.Exec(t, e.pool, `ALTER TABLE shipments DROP CONSTRAINT bad_deploy`)

	if err := chromedp.Do(ctx, chromedp.Navigate(r.url+"/live")); err != nil {
		t.Fatalf("opening the page: %v", err)
	}
	tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	item := fmt.Sprintf(`#dlq li[data-dead-letter-id="%d"]`, d.ID)
	err := chromedp.Do(tctx,
		chromedp.SetValue(chromedp.CSS(`#key`), e.keyFor("admin")),
		chromedp.Click(chromedp.CSS(`#key-form button`)),
		chromedp.WaitVisible(chromedp.CSS(item+` button.redrive`)),
	)
	if err != nil {
		t.Fatalf("the dead letter and its re-drive button: %v", err)
	}
	line, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(item+` span`)))
	if err != nil || !strings.Contains(line, "delivery:") || !strings.Contains(line, "23514") || !strings.Contains(line, id[len(id)-8:]) {
		t.Fatalf("dead letter line %q (%v): want the order, the participant and the reason", line, err)
	}
	err = chromedp.Do(tctx,
		chromedp.Click(chromedp.CSS(item+` button.redrive`)),
		chromedp.WaitVisible(chromedp.CSS(item+` .redriven`)),
	)
	if err != nil {
		t.Fatalf("clicking re-drive: %v", err)
	}
	if o := r.await(t, id, 30*time.Second); o.Status != event.StatusShipped {
		t.Fatalf("re-driven order ended %s", o.Status)
	}
	if trail := r.trail(t, id); !slices.Contains(trail, deadletter.TrailType) {
		t.Fatalf("the trail %v does not record the re-drive", trail)
	}
	if err := chromedp.Do(tctx, chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`.col[data-status="SHIPPED"] .card[data-order-id="%s"]`, id)))); err != nil {
		t.Fatalf("the page does not show the order SHIPPED: %v", err)
	}
}

// The live page's "re-drive all matching": a bad deploy makes delivery
// dead-letter two orders' PaymentCompleted, and status dead-letters a
// poison record. An admin filters by participant; the dry run lists the
// two and changes nothing; the confirm re-drives exactly those, the
// orders ship, status's dead letter stays open, and the run is recorded
// with the admin's key. A user's page offers no such form.
func TestLivePageReDrivesAllMatching(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	schematest.Exec(t, e.pool, `ALTER TABLE shipments ADD CONSTRAINT bad_deploy CHECK (carrier <> 'prozess-post')`)
	var ids []string
	var dls []int64
	for range 2 {
		id := r.order(t, "u1", "", mouse(1)).OrderID.String()
		ids = append(ids, id)
		dls = append(dls, r.awaitOrderDeadLetter(t, id, "delivery").ID)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(r.sys.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(t.Context(), &kgo.Record{Topic: cfg.Topic, Key: []byte(ids[0]), Value: []byte("{not json"), Headers: []kgo.RecordHeader{
		{Key: "ce_specversion", Value: []byte("1.0")}, {Key: "ce_type", Value: []byte("OrderShipped")}}}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	poison := r.awaitOrderDeadLetter(t, ids[0], "status")
	schematest.Exec(t, e.pool, `ALTER TABLE shipments DROP CONSTRAINT bad_deploy`)

	if err := chromedp.Do(ctx, chromedp.Navigate(r.url+"/live")); err != nil {
		t.Fatalf("opening the page: %v", err)
	}
	tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	err = chromedp.Do(tctx,
		chromedp.SetValue(chromedp.CSS(`#key`), e.keyFor("u1")),
		chromedp.Click(chromedp.CSS(`#key-form button`)),
		chromedp.WaitVisible(chromedp.CSS(`#conn.on`)),
		discard(chromedp.Poll[bool](`document.querySelector('#dlq-note').textContent !== ""`)),
	)
	if err != nil {
		t.Fatalf("connecting as a user: %v", err)
	}
	if hidden, err := chromedp.Run(tctx, chromedp.Evaluate[bool](`document.querySelector('#redrive-form').hidden`)); err != nil || !hidden {
		t.Fatalf("a user's page shows the re-drive form (hidden %v, %v)", hidden, err)
	}
	err = chromedp.Do(tctx,
		chromedp.SetValue(chromedp.CSS(`#key`), e.keyFor("admin")),
		chromedp.Click(chromedp.CSS(`#key-form button`)),
		chromedp.WaitVisible(chromedp.CSS(`#redrive-form`)),
		chromedp.SetValue(chromedp.CSS(`#rd-participant`), "delivery"),
		chromedp.SetValue(chromedp.CSS(`#rd-reason`), "bad_deploy"),
		chromedp.Click(chromedp.CSS(`#rd-preview`)),
		chromedp.WaitVisible(chromedp.CSS(`#rd-confirm`)),
	)
	if err != nil {
		t.Fatalf("the dry run: %v", err)
	}
	listed, err := chromedp.Run(tctx, chromedp.Evaluate[[]int64](`[...document.querySelectorAll('#rd-result li')].map(li => Number(li.dataset.deadLetterId))`))
	if err != nil || !slices.Equal(listed, dls) {
		t.Fatalf("the dry run lists dead letters %v (%v), want %v", listed, err, dls)
	}
	if sum, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(`#rd-summary`))); err != nil || !strings.Contains(sum, "dry run: 2 match") {
		t.Errorf("dry run summary %q (%v)", sum, err)
	}
	if n := e.count(`SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL`); n != 3 || e.count(`SELECT count(*) FROM redrives`) != 0 {
		t.Fatalf("the dry run changed something: %d open dead letters, want 3", n)
	}
	err = chromedp.Do(tctx,
		chromedp.Click(chromedp.CSS(`#rd-confirm`)),
		chromedp.WaitVisible(chromedp.CSS(`#rd-result[data-redrive-id]`)),
	)
	if err != nil {
		t.Fatalf("confirming the re-drive: %v", err)
	}
	for _, id := range ids {
		if o := r.await(t, id, 30*time.Second); o.Status != event.StatusShipped {
			t.Fatalf("re-driven order %s ended %s", id, o.Status)
		}
		if n := e.count(`SELECT count(*) FROM shipments WHERE order_id = $1`, id); n != 1 {
			t.Fatalf("order %s has %d shipments", id, n)
		}
	}
	if n := e.count(`SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL AND id = $1`, poison.ID); n != 1 ||
		e.count(`SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL`) != 1 {
		t.Fatal("status's dead letter should be the only one left open")
	}
	if n := e.count(`SELECT count(*) FROM redrives WHERE ids = $1 AND done_by LIKE 'admin key %' AND filter->>'participant' = 'delivery'`, dls); n != 1 {
		t.Fatal("no audit row naming the admin's key for the page's re-drive")
	}
	if err := chromedp.Do(tctx, chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`#dlq li[data-dead-letter-id="%d"] .redriven`, dls[0])))); err != nil {
		t.Fatalf("the dead letter's line is not marked re-driven: %v", err)
	}
}

// The live page's Cancel button, on the refund path: delivery is down, so
// an order placed in the page stops at PAID; its owner clicks Cancel on
// its card, which then says the cancel was requested. Once delivery is
// back it withholds the order, payment refunds it, and the card moves to
// CANCELLED with the refund as its last event, and no Cancel button; the
// stock comes back.
func TestLivePageCancelsAnOrder(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "api", "inventory", "payment", "status")
	if err := chromedp.Do(ctx, chromedp.Navigate(r.url+"/live")); err != nil {
		t.Fatalf("opening the page: %v", err)
	}
	tctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	mouseStock := chromedp.CSS(`#stock tr[data-product-id="prod-mouse"] td.n`)
	err := chromedp.Do(tctx,
		chromedp.WaitVisible(mouseStock),
		chromedp.SetValue(chromedp.CSS(`#key`), e.keyFor("u1")),
		chromedp.Click(chromedp.CSS(`#key-form button`)),
		chromedp.WaitVisible(chromedp.CSS(`#conn.on`)),
		chromedp.SetValue(chromedp.CSS(`#product`), "prod-mouse"),
		chromedp.SetValue(chromedp.CSS(`#qty`), "3"),
	)
	if err != nil {
		t.Fatalf("filling in the order form: %v", err)
	}
	before := atoi(t, pageText(t, tctx, `#stock tr[data-product-id="prod-mouse"] td.n`))
	id := placeInPage(t, tctx)
	if o := r.awaitStatus(t, id, event.StatusPaid, 30*time.Second); o.Status != event.StatusPaid {
		t.Fatalf("order is %s, want PAID", o.Status)
	}
	card := fmt.Sprintf(`.col[data-status="%%s"] .card[data-order-id="%s"]`, id)
	err = chromedp.Do(tctx,
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(card, "PAID")+` button.cancel`)),
		chromedp.Click(chromedp.CSS(fmt.Sprintf(card, "PAID")+` button.cancel`)),
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(card, "PAID")+` em`)),
	)
	if err != nil {
		t.Fatalf("clicking Cancel on the PAID card: %v", err)
	}
	if said := pageText(t, tctx, fmt.Sprintf(card, "PAID")+` em`); said != "cancel requested" {
		t.Fatalf("the card says %q after Cancel, want %q", said, "cancel requested")
	}
	if n := e.count(`SELECT count(*) FROM orders WHERE id = $1 AND cancel_requested_by = 'u1'`, id); n != 1 {
		t.Fatal("the click did not record u1's cancel")
	}

	e.start(cfg, "delivery")
	if o := r.await(t, id, 30*time.Second); o.Status != event.StatusCancelled {
		t.Fatalf("order ended %s, want CANCELLED", o.Status)
	}
	r.awaitTrailHas(t, id, event.PaymentRefunded, event.InventoryReleased)
	err = chromedp.Do(tctx,
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(card, "CANCELLED"))),
		discard(chromedp.Poll[bool](fmt.Sprintf(
			`document.querySelector('#stock tr[data-product-id="prod-mouse"] td.n').textContent === "%d"`, before))),
		discard(chromedp.Poll[bool](`[...document.querySelectorAll('#events li span')].some((s) => s.textContent === "PaymentRefunded")`)),
	)
	if err != nil {
		t.Fatalf("watching the cancelled order's card and stock: %v", err)
	}
	// The card names the order's latest event: the refund, or, a moment
	// later (sooner on a loaded machine), the release that follows it.
	if label := pageText(t, tctx, fmt.Sprintf(card, "CANCELLED")+` small`); !strings.HasPrefix(label, string(event.PaymentRefunded)) &&
		!strings.HasPrefix(label, string(event.InventoryReleased)) {
		t.Errorf("the CANCELLED card's label is %q, want the refund or the release after it", label)
	}
	if n, err := chromedp.Run(tctx, chromedp.Evaluate[int](fmt.Sprintf(`document.querySelectorAll('%s button.cancel').length`, fmt.Sprintf(card, "CANCELLED")))); err != nil || n != 0 {
		t.Errorf("the CANCELLED card has %d Cancel buttons (%v), want none", n, err)
	}
}

// pageText is the text of the first element sel matches.
func pageText(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("reading %s: %v", sel, err)
	}
	return s
}
