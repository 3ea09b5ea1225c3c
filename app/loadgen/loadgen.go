// Package loadgen drives prozess with an open-loop load of orders and
// measures what a user sees: POST latency and end-to-end latency from an
// order being due to its terminal event, observed on the topic by a consumer
// group of its own. It also reads the database's own statistics to report
// transactions, WAL fsyncs and WAL bytes per order.
package loadgen

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app/saga"
	"github.com/prozess/prozess/modules/api"
	"github.com/prozess/prozess/modules/event"
)

// Config is one load run.
type Config struct {
	URL         string        // the api's base URL
	Kafka       saga.Conn     // to observe terminal events
	Topic       string        // the saga topic
	DatabaseURL string        // for per-order costs; empty skips them
	Rate        float64       // orders per second
	Duration    time.Duration // measured part of a run
	Warmup      time.Duration // sent at Rate before measuring, not counted
	MaxInFlight int           // requests over this are dropped, never delayed
	Deadline    time.Duration // how long after the last send orders may take to finish
	Product     string        // what every order buys, one unit, when Catalogue is nil
	Catalogue   *Catalogue    // when set, what orders buy instead: many products, skewed
	APIKey      string        // sent as Authorization: Bearer
	// CancelRate is the share (0 to 1) of accepted orders the run cancels
	// (POST /orders/{id}/cancel), each at a random moment within
	// CancelWithin of its acceptance, so cancels race every step of the
	// saga: some before the charge, some between charge and shipment
	// (refunded), some after the shipment (409).
	CancelRate   float64
	CancelWithin time.Duration
}

// Result is what a run measured.
type Result struct {
	TargetRate  float64        `json:"target_rate"`
	Sent        int            `json:"sent"`
	Accepted    int            `json:"accepted"`
	Errors      int            `json:"errors"`
	Dropped     int            `json:"dropped"`
	Finished    int            `json:"finished"`
	Unfinished  int            `json:"unfinished"`
	Throughput  float64        `json:"throughput_per_s"` // measured orders finished / measured span
	Post        Summary        `json:"post_latency"`
	EndToEnd    Summary        `json:"end_to_end_latency"`
	Outcomes    map[string]int `json:"outcomes"`
	Cancels     *Cancels       `json:"cancels,omitempty"`
	Cost        *Cost          `json:"per_order_cost,omitempty"`
	FirstErrors []string       `json:"first_errors,omitempty"`
	// Hops breaks the shipped orders' end-to-end latency into stretches
	// (see hops.go).
	Hops []Hop `json:"hops,omitempty"`
}

// Cancels counts a run's cancel requests by answer: accepted (202, the
// order will end CANCELLED), refused (409, it had shipped), and errors.
type Cancels struct {
	Sent     int `json:"sent"`
	Accepted int `json:"accepted"`
	Refused  int `json:"refused"`
	Errors   int `json:"errors"`
}

// Cost is what one order cost the database, from its own statistics.
type Cost struct {
	Transactions float64 `json:"transactions"`
	WALSyncs     float64 `json:"wal_fsyncs"`
	WALBytes     float64 `json:"wal_bytes"`
}

// Runner holds the clients of a run.
type Runner struct {
	cfg    Config
	log    *slog.Logger
	http   *http.Client
	client *kgo.Client

	mu       sync.Mutex
	due      map[string]time.Time // measured order -> due time
	terminal map[string]time.Time // order -> when its terminal event was seen
	outcome  map[string]event.Type
	stamps   map[string]map[event.Type]stamp // order -> its events' decision and publish times
}

// New connects the observer to the topic and waits until it is assigned its
// partitions, so no terminal event of the run can be missed.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Runner, error) {
	if cfg.Rate <= 0 || cfg.Duration <= 0 || cfg.MaxInFlight <= 0 {
		return nil, fmt.Errorf("--rate, --duration and --max-inflight must be positive")
	}
	if cfg.CancelRate < 0 || cfg.CancelRate > 1 {
		return nil, fmt.Errorf("--cancel-rate %v is not between 0 and 1", cfg.CancelRate)
	}
	if cfg.CancelRate > 0 && cfg.CancelWithin <= 0 {
		return nil, fmt.Errorf("--cancel-within must be positive with --cancel-rate")
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	assigned := make(chan struct{})
	var once sync.Once
	client, err := cfg.Kafka.Client(
		kgo.ConsumerGroup("prozess-loadgen-"+hex.EncodeToString(b)),
		kgo.ConsumeTopics(cfg.Topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtEnd()),
		kgo.FetchMaxWait(100*time.Millisecond),
		kgo.OnPartitionsAssigned(func(context.Context, *kgo.Client, map[string][]int32) { once.Do(func() { close(assigned) }) }),
	)
	if err != nil {
		return nil, fmt.Errorf("creating observer: %w", err)
	}
	r := &Runner{cfg: cfg, log: log, client: client,
		http: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: cfg.MaxInFlight}},
		due:  map[string]time.Time{}, terminal: map[string]time.Time{}, outcome: map[string]event.Type{},
		stamps: map[string]map[event.Type]stamp{}}
	go r.observe(ctx)
	select {
	case <-assigned:
	case <-time.After(30 * time.Second):
		client.Close()
		return nil, fmt.Errorf("observer not assigned partitions of %s at %v within 30s", cfg.Topic, cfg.Kafka.Brokers)
	}
	time.Sleep(500 * time.Millisecond) // let the end offsets resolve before the first order
	return r, nil
}

// Close closes the observer.
func (r *Runner) Close() { r.client.Close() }

func (r *Runner) observe(ctx context.Context) {
	for {
		fs := r.client.PollFetches(ctx)
		if fs.IsClientClosed() || ctx.Err() != nil {
			return
		}
		now := time.Now()
		fs.EachRecord(func(rec *kgo.Record) {
			typ, st, ok := stampOf(rec)
			if !ok {
				return
			}
			r.mu.Lock()
			if r.stamps[string(rec.Key)] == nil {
				r.stamps[string(rec.Key)] = map[event.Type]stamp{}
			}
			r.stamps[string(rec.Key)][typ] = st
			r.mu.Unlock()
			if typ != event.OrderShipped && typ != event.InventoryFailed && typ != event.PaymentFailed && typ != event.PaymentRefunded {
				return
			}
			r.mu.Lock()
			if _, ok := r.terminal[string(rec.Key)]; !ok {
				r.terminal[string(rec.Key)] = now
				r.outcome[string(rec.Key)] = typ
			}
			r.mu.Unlock()
		})
	}
}

// Run sends the warm-up and the measured load, waits for the orders to
// finish, and reports.
func (r *Runner) Run(ctx context.Context) (Result, error) {
	var before *dbStats
	res := Result{TargetRate: r.cfg.Rate, Outcomes: map[string]int{}}
	if r.cfg.Warmup > 0 {
		r.send(ctx, r.cfg.Warmup, false, &res)
	}
	if r.cfg.DatabaseURL != "" {
		s, err := readDBStats(ctx, r.cfg.DatabaseURL)
		if err != nil {
			return res, err
		}
		before = s
	}
	res = Result{TargetRate: r.cfg.Rate, Outcomes: map[string]int{}}
	start := time.Now()
	r.send(ctx, r.cfg.Duration, true, &res)
	deadline := time.Now().Add(r.cfg.Deadline)
	for time.Now().Before(deadline) && r.unfinished() > 0 && ctx.Err() == nil {
		time.Sleep(20 * time.Millisecond)
	}
	var e2e []time.Duration
	var last time.Time
	r.mu.Lock()
	for id, due := range r.due {
		done, ok := r.terminal[id]
		if !ok {
			res.Unfinished++
			continue
		}
		res.Finished++
		res.Outcomes[string(r.outcome[id])]++
		e2e = append(e2e, done.Sub(due))
		if done.After(last) {
			last = done
		}
	}
	res.Hops = hops(r.due, r.stamps, r.terminal)
	r.mu.Unlock()
	res.EndToEnd = Summarize(e2e)
	if span := last.Sub(start).Seconds(); span > 0 {
		res.Throughput = float64(res.Finished) / max(span, r.cfg.Duration.Seconds())
	}
	if before != nil && res.Finished > 0 {
		time.Sleep(time.Second) // statistics are flushed at most once a second
		after, err := readDBStats(ctx, r.cfg.DatabaseURL)
		if err != nil {
			return res, err
		}
		n := float64(res.Finished)
		res.Cost = &Cost{
			Transactions: float64(after.xacts-before.xacts) / n,
			WALSyncs:     float64(after.walSyncs-before.walSyncs) / n,
			WALBytes:     float64(after.walBytes-before.walBytes) / n,
		}
	}
	return res, nil
}

func (r *Runner) unfinished() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for id := range r.due {
		if _, ok := r.terminal[id]; !ok {
			n++
		}
	}
	return n
}

// send runs the open loop for d: each request is due on the schedule, sent
// then if fewer than MaxInFlight are outstanding, dropped otherwise.
func (r *Runner) send(ctx context.Context, d time.Duration, measure bool, res *Result) {
	var inflight, sent, accepted, errs, dropped atomic.Int64
	var cancels [4]atomic.Int64 // sent, accepted, refused, errors
	var postMu sync.Mutex
	var post []time.Duration
	var firstErrs []string
	var wg sync.WaitGroup
	body, _ := json.Marshal(map[string]any{"items": []event.Item{{ProductID: r.cfg.Product, Qty: 1}}})
	orderBody := func() []byte { return body }
	if c := r.cfg.Catalogue; c != nil {
		orderBody = func() []byte {
			b, _ := json.Marshal(map[string]any{"items": c.Order()})
			return b
		}
	}
	progress := time.NewTicker(time.Second)
	defer progress.Stop()
	started := time.Now()
	for _, due := range Schedule(started, r.cfg.Rate, d) {
		if wait := time.Until(due); wait > 0 {
			select {
			case <-ctx.Done():
				wg.Wait()
				return
			case <-time.After(wait):
			}
		}
		select {
		case <-progress.C:
			phase := "warm-up"
			if measure {
				phase = "measure"
			}
			r.log.Info("load", "phase", phase, "t", time.Since(started).Round(time.Second), "sent", sent.Load(),
				"accepted", accepted.Load(), "errors", errs.Load(), "dropped", dropped.Load(), "in_flight", inflight.Load(),
				"unfinished", r.unfinished())
		default:
		}
		if inflight.Load() >= int64(r.cfg.MaxInFlight) {
			dropped.Add(1)
			continue
		}
		inflight.Add(1)
		sent.Add(1)
		wg.Add(1)
		go func(due time.Time, body []byte) {
			defer wg.Done()
			defer inflight.Add(-1)
			id, err := r.post(ctx, body)
			lat := time.Since(due)
			if err != nil {
				errs.Add(1)
				postMu.Lock()
				if len(firstErrs) < 5 {
					firstErrs = append(firstErrs, err.Error())
				}
				postMu.Unlock()
				return
			}
			accepted.Add(1)
			if r.cfg.CancelRate > 0 && mrand.Float64() < r.cfg.CancelRate {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r.cancel(ctx, id, &cancels)
				}()
			}
			if !measure {
				return
			}
			postMu.Lock()
			post = append(post, lat)
			postMu.Unlock()
			r.mu.Lock()
			r.due[id] = due
			r.mu.Unlock()
		}(due, orderBody())
	}
	wg.Wait()
	res.Sent, res.Accepted, res.Errors, res.Dropped = int(sent.Load()), int(accepted.Load()), int(errs.Load()), int(dropped.Load())
	res.Post = Summarize(post)
	res.FirstErrors = firstErrs
	if r.cfg.CancelRate > 0 {
		res.Cancels = &Cancels{Sent: int(cancels[0].Load()), Accepted: int(cancels[1].Load()),
			Refused: int(cancels[2].Load()), Errors: int(cancels[3].Load())}
	}
}

// cancel asks for order id to be cancelled after a random wait within
// CancelWithin, and counts the answer in n (sent, accepted, refused,
// errors).
func (r *Runner) cancel(ctx context.Context, id string, n *[4]atomic.Int64) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Duration(mrand.Int64N(int64(r.cfg.CancelWithin)))):
	}
	n[0].Add(1)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.cfg.URL+"/orders/"+id+"/cancel", nil)
	if err != nil {
		n[3].Add(1)
		return
	}
	if r.cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+r.cfg.APIKey)
	}
	resp, err := r.http.Do(req)
	if err != nil {
		n[3].Add(1)
		r.log.Warn("cancel failed", "order_id", id, "err", err)
		return
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusAccepted:
		n[1].Add(1)
	case http.StatusConflict:
		n[2].Add(1)
	default:
		n[3].Add(1)
		r.log.Warn("cancel refused", "order_id", id, "status", resp.StatusCode, "body", string(bytes.TrimSpace(b)))
	}
}

func (r *Runner) post(ctx context.Context, body []byte) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.cfg.URL+"/orders", bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	if r.cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+r.cfg.APIKey)
	}
	resp, err := r.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		return "", fmt.Errorf("POST /orders: %d %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	var out struct {
		OrderID string `json:"order_id"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return "", fmt.Errorf("POST /orders: %w", err)
	}
	return out.OrderID, nil
}

type dbStats struct{ xacts, walSyncs, walBytes int64 }

// readDBStats reads committed transactions of the database and the
// cluster's WAL fsyncs and bytes (pg_stat_wal is cluster-wide).
func readDBStats(ctx context.Context, url string) (*dbStats, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("cannot reach PostgreSQL for statistics: %w", err)
	}
	defer conn.Close(ctx)
	var s dbStats
	err = conn.QueryRow(ctx, `
		SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
		       wal_sync, wal_bytes::bigint FROM pg_stat_wal`).Scan(&s.xacts, &s.walSyncs, &s.walBytes)
	if err != nil {
		return nil, fmt.Errorf("reading database statistics: %w", err)
	}
	return &s, nil
}

// NewKey creates an API key for the load generator's user, so a run needs
// no setup; the server's --rate-limit must allow the rate.
func NewKey(ctx context.Context, url string) (string, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return "", fmt.Errorf("cannot reach PostgreSQL to create an API key: %w", err)
	}
	defer conn.Close(ctx)
	_, key, err := api.CreateKey(ctx, conn, "loadgen", false)
	return key, err
}

// EnsureProduct creates the product every load order buys, with stock
// enough for any run, so a run measures the saga's full path rather than
// running out. It restocks that one product (stock and received together,
// so stock conservation holds) and touches no other.
func EnsureProduct(ctx context.Context, url, id string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("cannot reach PostgreSQL to prepare %s: %w", id, err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, restock+` VALUES ($1, 'Load test item', 100, `+ampleStock+`, `+ampleStock+`)
		ON CONFLICT (id) DO UPDATE SET `+topUp, id)
	if err != nil {
		return fmt.Errorf("preparing product %s: %w", id, err)
	}
	return nil
}

// Table renders results as a fixed-width table, one row per run.
func Table(rs []Result) string {
	var b bytes.Buffer
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/1e6) }
	fmt.Fprintf(&b, "%8s %8s %7s %6s %6s %6s | %-34s | %-34s | %s\n", "rate/s", "done/s", "sent", "err", "drop", "unfin",
		"POST ms p50/p90/p99/p99.9/max", "end-to-end ms p50/p90/p99/p99.9/max", "per order: xact fsync WALbytes")
	for _, r := range rs {
		cost := "-"
		if r.Cost != nil {
			cost = fmt.Sprintf("%.2f %.2f %.0f", r.Cost.Transactions, r.Cost.WALSyncs, r.Cost.WALBytes)
		}
		fmt.Fprintf(&b, "%8.0f %8.1f %7d %6d %6d %6d | %-34s | %-34s | %s\n", r.TargetRate, r.Throughput, r.Sent, r.Errors, r.Dropped, r.Unfinished,
			ms(r.Post.P50)+"/"+ms(r.Post.P90)+"/"+ms(r.Post.P99)+"/"+ms(r.Post.P999)+"/"+ms(r.Post.Max),
			ms(r.EndToEnd.P50)+"/"+ms(r.EndToEnd.P90)+"/"+ms(r.EndToEnd.P99)+"/"+ms(r.EndToEnd.P999)+"/"+ms(r.EndToEnd.Max), cost)
	}
	return b.String()
}

// KeptUp reports whether the system kept up with a run: everything sent,
// accepted and finished, at (nearly) the target rate.
func (r Result) KeptUp() bool {
	return r.Errors == 0 && r.Dropped == 0 && r.Unfinished == 0 && r.Throughput >= 0.95*r.TargetRate
}
