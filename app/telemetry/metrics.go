// Package telemetry is how a prozess process is observed: its Prometheus
// metrics, its OpenTelemetry traces, its logger, and the operator endpoints
// that serve them (/metrics, /livez, /readyz, pprof). It knows nothing of
// participants or of the saga runtime; they report to it.
package telemetry

import (
	"context"
	"math"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/plugin/kprom"
)

// Metrics is a process's Prometheus registry and the instruments the
// machinery updates. Names follow Prometheus conventions: the prozess_
// prefix, base units, _total for counters.
type Metrics struct {
	reg           *prometheus.Registry
	httpRequests  *prometheus.CounterVec
	httpDuration  *prometheus.HistogramVec
	batchDuration *prometheus.HistogramVec
	batchSize     *prometheus.HistogramVec
	retries       *prometheus.CounterVec
	published     prometheus.Counter
	publishErrors *prometheus.CounterVec
	outOfRange    *prometheus.CounterVec
	stepDuration  *prometheus.HistogramVec
	expired       prometheus.Counter
	paidOverdue   prometheus.Gauge
}

// NewMetrics registers the process's instruments, the Go runtime's and the
// process's own.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{
		reg: reg,
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "prozess_http_requests_total",
			Help: "HTTP requests answered, by route, method and status code."}, []string{"route", "method", "code"}),
		httpDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "prozess_http_request_duration_seconds",
			Help: "Time to answer an HTTP request, by route and method.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)},
			[]string{"route", "method"}),
		batchDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "prozess_consumer_batch_duration_seconds",
			Help: "Time to apply one polled batch (transaction and commits), by participant.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)},
			[]string{"participant"}),
		batchSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "prozess_consumer_batch_records",
			Help: "Records in one polled batch, by participant.", Buckets: prometheus.ExponentialBuckets(1, 2, 11)},
			[]string{"participant"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "prozess_consumer_retries_total",
			Help: "Batches retried after a transient failure, by participant."}, []string{"participant"}),
		outOfRange: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "prozess_consumer_offset_out_of_range_total",
			Help: "Times a participant found its committed offset deleted by retention (it stops rather than skip records)."}, []string{"participant"}),
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "prozess_relay_published_records_total",
			Help: "Outbox records the relay published to Kafka."}),
		publishErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "prozess_relay_publish_errors_total",
			Help: "Outbox records the relay could not publish this time (kept and tried again), by Kafka's error code."}, []string{"code"}),
		stepDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "prozess_saga_step_duration_seconds",
			Help: "Time from one saga event to the event a participant emitted in answer (outbox, relay, " +
				"Kafka and handling), by the two event types: OrderCreated to InventoryReserved is the reserve step.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16)}, []string{"from", "to"}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{Name: "prozess_saga_expired_orders_total",
			Help: "Orders this process expired: not past payment by --saga-deadline, so cancelled and their stock given back."}),
		paidOverdue: prometheus.NewGauge(prometheus.GaugeOpts{Name: "prozess_saga_paid_overdue_orders",
			Help: "Paid orders older than --saga-deadline that have not shipped (never cancelled: they need an operator), " +
				"as of this process's last sweep; -1 before the first."}),
	}
	m.paidOverdue.Set(-1)
	reg.MustRegister(m.httpRequests, m.httpDuration, m.batchDuration, m.batchSize, m.retries, m.published, m.publishErrors, m.stepDuration, m.outOfRange,
		m.expired, m.paidOverdue)
	return m
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Register adds collectors that read state at scrape time.
func (m *Metrics) Register(cs ...prometheus.Collector) { m.reg.MustRegister(cs...) }

// KafkaHooks gives a Kafka client franz-go's own metrics (kprom), labelled
// with its client id; none on a nil *Metrics.
func (m *Metrics) KafkaHooks() []kgo.Opt {
	if m == nil {
		return nil
	}
	return []kgo.Opt{kgo.WithHooks(kprom.NewMetrics("prozess", kprom.Subsystem("kafka"), kprom.Registerer(m.reg), kprom.WithClientLabel()))}
}

// ObserveBatch records one applied batch of a participant's consumer. The
// Observe and Count methods do nothing on a nil *Metrics, so code that
// reports to them needs no metrics to run.
func (m *Metrics) ObserveBatch(participant string, records int, took time.Duration) {
	if m == nil {
		return
	}
	m.batchSize.WithLabelValues(participant).Observe(float64(records))
	m.batchDuration.WithLabelValues(participant).Observe(took.Seconds())
}

// CountRetry counts a batch retried after a transient failure.
func (m *Metrics) CountRetry(participant string) {
	if m != nil {
		m.retries.WithLabelValues(participant).Inc()
	}
}

// CountOutOfRange counts a consumer that found its committed offset gone.
func (m *Metrics) CountOutOfRange(participant string) {
	if m != nil {
		m.outOfRange.WithLabelValues(participant).Inc()
	}
}

// RegisterBuildInfo adds prozess_build_info, always 1, whose labels name
// the build: join it to any series by instance to see what version runs.
func (m *Metrics) RegisterBuildInfo(version, commit, goVersion string) {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "prozess_build_info",
		Help:        "The build of this process (always 1): its version, commit and Go version.",
		ConstLabels: prometheus.Labels{"version": version, "commit": commit, "goversion": goVersion}})
	g.Set(1)
	m.reg.MustRegister(g)
}

// RegisterGaugeFunc adds a gauge read from fn at scrape time.
func (m *Metrics) RegisterGaugeFunc(name, help string, fn func() float64) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, fn))
}

// RegisterFlag adds a gauge that is 1 while fn reports true, else 0.
func (m *Metrics) RegisterFlag(name, help string, fn func() bool) {
	m.RegisterGaugeFunc(name, help, func() float64 {
		if fn() {
			return 1
		}
		return 0
	})
}

// RegisterCounterFunc adds a counter read from fn at scrape time.
func (m *Metrics) RegisterCounterFunc(name, help string, fn func() float64) {
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, fn))
}

// ObserveSweep records one sweep of the saga deadline's expirer.
func (m *Metrics) ObserveSweep(expired int, paidOverdue int64) {
	if m != nil {
		m.expired.Add(float64(expired))
		m.paidOverdue.Set(float64(paidOverdue))
	}
}

// CountPublished counts records the relay published.
func (m *Metrics) CountPublished(n int) {
	if m != nil {
		m.published.Add(float64(n))
	}
}

// ObserveStep records one saga step: from an event to the event a
// participant emitted in answer for the same order.
func (m *Metrics) ObserveStep(from, to string, took time.Duration) {
	if m != nil {
		m.stepDuration.WithLabelValues(from, to).Observe(took.Seconds())
	}
}

// Middleware counts and times every request by its route pattern, never
// its raw path, so ids do not explode the label space.
func (m *Metrics) Middleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		start := time.Now()
		err := next(c)
		if err != nil {
			c.Error(err) // write the error response now, so its code is counted
		}
		route := c.Path()
		if route == "" {
			route = "unmatched"
		}
		m.httpRequests.WithLabelValues(route, c.Request().Method, strconv.Itoa(c.Response().Status)).Inc()
		m.httpDuration.WithLabelValues(route, c.Request().Method).Observe(time.Since(start).Seconds())
		return nil
	}
}

// Consumer is what the state collector reads of one participant's consumer
// at scrape time.
type Consumer struct {
	Group string // its consumer group, for the lag
	// Counts returns the records it applied, skipped as duplicates and
	// dead-lettered.
	Counts func() (applied, duplicates, deadLettered int64)
}

// StateCollector reads, at scrape time, what lives elsewhere: each
// consumer's counters and lag, the database's orders by status, the outbox,
// and the connection pool. What costs a query (orders by status, outbox,
// parked records, the broker's lag) is read at most once per StateInterval
// however often, and by however many, /metrics is scraped: a scrape never
// costs the database more than that.
type StateCollector struct {
	pool      *pgxpool.Pool
	admin     *kadm.Client
	consumers map[string]Consumer // by participant

	records, orders, outboxRows, outboxAge, parked, deadLetters, unpaidAge, poolConns, poolAcquires, lag, partitionLag, reads *prometheus.Desc

	mu       sync.Mutex
	costly   []prometheus.Metric // the last reading of the costly state
	readAt   time.Time
	readings atomic.Int64
}

// StateInterval is how long one reading of the costly state is served.
const StateInterval = 5 * time.Second

// NewStateCollector reads pool and, through admin, the consumers' groups.
func NewStateCollector(pool *pgxpool.Pool, admin *kadm.Client, consumers map[string]Consumer) *StateCollector {
	return &StateCollector{
		pool: pool, admin: admin, consumers: consumers,
		lag: prometheus.NewDesc("prozess_consumer_lag_records",
			"Records on the topic a participant's consumer group has not committed yet, summed over partitions (from the broker).",
			[]string{"participant"}, nil),
		partitionLag: prometheus.NewDesc("prozess_consumer_partition_lag_records",
			"Records on one partition a participant's consumer group has not committed yet (from the broker): "+
				"one stuck partition shows here while the sum hides it.",
			[]string{"participant", "group", "topic", "partition"}, nil),
		records: prometheus.NewDesc("prozess_consumer_records_total",
			"Records a participant handled, by outcome: applied, duplicate (skipped by the inbox) or dead_lettered.",
			[]string{"participant", "outcome"}, nil),
		orders: prometheus.NewDesc("prozess_orders",
			"Orders by status, from PostgreSQL (database-wide: every process exports the same value; aggregate with max). "+
				"Exact for the unfinished statuses (CREATED, INVENTORY_RESERVED, PAID: counted through their partial index) and for "+
				"every status while orders is under 1 MiB; beyond that SHIPPED and CANCELLED are the planner's estimate "+
				"(pg_class.reltuples scaled to the table's size, times the status's share in pg_stats), as fresh as the last ANALYZE.",
			[]string{"status"}, nil),
		outboxRows: prometheus.NewDesc("prozess_outbox_rows", "Outbox rows waiting for the relay, exact (a scan of the backlog itself; database-wide: aggregate with max).", nil, nil),
		parked: prometheus.NewDesc("prozess_relay_parked_records",
			"Outbox records the broker refused for good, parked in PostgreSQL, exact (prozess dlq list shows them; database-wide: aggregate with max).", nil, nil),
		deadLetters: prometheus.NewDesc("prozess_dead_letters_open",
			"Dead letters not replayed yet, exact, counted through their partial index (prozess dlq list shows them; database-wide: aggregate with max).", nil, nil),
		unpaidAge: prometheus.NewDesc("prozess_saga_oldest_unpaid_age_seconds",
			"Age of the oldest order not yet past payment (CREATED or INVENTORY_RESERVED, not expired), 0 when there is none: "+
				"it grows while a step before payment stalls (database-wide: aggregate with max).", nil, nil),
		outboxAge: prometheus.NewDesc("prozess_outbox_oldest_age_seconds",
			"Age of the oldest outbox row waiting for the relay (0 when empty; database-wide: aggregate with max).", nil, nil),
		poolConns:    prometheus.NewDesc("prozess_db_pool_connections", "PostgreSQL pool connections, by state.", []string{"state"}, nil),
		poolAcquires: prometheus.NewDesc("prozess_db_pool_acquires_total", "Connections acquired from the PostgreSQL pool.", nil, nil),
		reads: prometheus.NewDesc("prozess_metrics_state_reads_total",
			"Times a scrape read the database's and the broker's state (orders by status, outbox, lag): at most once per 5 s, however often /metrics is scraped.", nil, nil),
	}
}

func (c *StateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.records, c.orders, c.outboxRows, c.outboxAge, c.parked, c.deadLetters, c.unpaidAge, c.poolConns, c.poolAcquires, c.lag, c.partitionLag, c.reads} {
		ch <- d
	}
}

func (c *StateCollector) Collect(ch chan<- prometheus.Metric) {
	for name, cs := range c.consumers {
		applied, dups, dead := cs.Counts()
		for outcome, v := range map[string]int64{"applied": applied, "duplicate": dups, "dead_lettered": dead} {
			ch <- prometheus.MustNewConstMetric(c.records, prometheus.CounterValue, float64(v), name, outcome)
		}
	}
	s := c.pool.Stat()
	ch <- prometheus.MustNewConstMetric(c.poolConns, prometheus.GaugeValue, float64(s.AcquiredConns()), "acquired")
	ch <- prometheus.MustNewConstMetric(c.poolConns, prometheus.GaugeValue, float64(s.IdleConns()), "idle")
	ch <- prometheus.MustNewConstMetric(c.poolAcquires, prometheus.CounterValue, float64(s.AcquireCount()))

	c.mu.Lock()
	if c.costly == nil || time.Since(c.readAt) >= StateInterval {
		c.costly, c.readAt = c.readCostly(), time.Now()
		c.readings.Add(1)
	}
	costly := c.costly
	c.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(c.reads, prometheus.CounterValue, float64(c.readings.Load()))
	for _, m := range costly {
		ch <- m
	}
}

// readCostly reads the state that costs queries; what fails to read is
// left out rather than reported as zero. No query here reads a table in
// proportion to its size: orders, order_events and dead_letters grow for
// ever, and every process runs these every StateInterval, so each is bounded
// by a partial index (the unfinished orders, the open dead letters) or read
// from the planner's statistics (TestScrapeQueriesScanNoGrowingTable EXPLAINs
// every one). The outbox and parked rows are backlogs: counting them costs
// what is waiting, which is what the gauges report.
func (c *StateCollector) readCostly() []prometheus.Metric {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ms := c.readOrders(ctx)
	var n int64
	var age float64
	if err := c.pool.QueryRow(ctx, `SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM outbox`).Scan(&n, &age); err == nil {
		ms = append(ms, prometheus.MustNewConstMetric(c.outboxRows, prometheus.GaugeValue, float64(n)),
			prometheus.MustNewConstMetric(c.outboxAge, prometheus.GaugeValue, age))
	}
	if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM parked`).Scan(&n); err == nil {
		ms = append(ms, prometheus.MustNewConstMetric(c.parked, prometheus.GaugeValue, float64(n)))
	}
	// dead_letters_open_idx (migration 00012) holds exactly these rows.
	if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL`).Scan(&n); err == nil {
		ms = append(ms, prometheus.MustNewConstMetric(c.deadLetters, prometheus.GaugeValue, float64(n)))
	}
	// The saga deadline's partial index (orders_unfinished_idx) holds
	// exactly these rows, ordered by created_at: one index probe.
	if err := c.pool.QueryRow(ctx, `SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM orders
		WHERE status IN ('CREATED', 'INVENTORY_RESERVED') AND expired_at IS NULL`).Scan(&age); err == nil {
		ms = append(ms, prometheus.MustNewConstMetric(c.unpaidAge, prometheus.GaugeValue, age))
	}
	return append(ms, c.readLag(ctx)...)
}

// smallOrders is the size under which orders is counted exactly by
// status: a scan of 128 pages is cheap, and a young table may have no
// statistics yet to estimate from (autovacuum analyses it later).
const smallOrders = 1 << 20

// readOrders reads prozess_orders. The unfinished statuses are counted
// exactly through orders_status_idx, whose predicate is theirs (an
// index-only scan of what is in flight). The finished ones only grow, so
// past smallOrders they are the planner's estimate, as PostgreSQL's own
// planner makes it: the tuple density of the last VACUUM or ANALYZE times
// the table's current pages, times the status's frequency among the most
// common values. A maintained count would be exact, but every status
// transaction would update its row, serialising the single status writer.
// Without statistics on a table past smallOrders the finished statuses are
// left out rather than counted by a full scan.
func (c *StateCollector) readOrders(ctx context.Context) []prometheus.Metric {
	var ms []prometheus.Metric
	add := func(status string, n float64) {
		ms = append(ms, prometheus.MustNewConstMetric(c.orders, prometheus.GaugeValue, n, status))
	}
	rows, err := c.pool.Query(ctx, `SELECT status, count(*) FROM orders WHERE status NOT IN ('SHIPPED', 'CANCELLED') GROUP BY status`)
	if err != nil {
		return nil
	}
	var status string
	var n int64
	for rows.Next() {
		if rows.Scan(&status, &n) == nil {
			add(status, float64(n))
		}
	}
	rows.Close()
	if rows.Err() != nil {
		return nil
	}
	var (
		tuples      float64
		pages, size int64
		block       int64
		vals        []string
		freqs       []float32
	)
	err = c.pool.QueryRow(ctx, `
		SELECT c.reltuples::float8, c.relpages::int8, pg_relation_size(c.oid), current_setting('block_size')::int8,
		       s.most_common_vals::text::text[], s.most_common_freqs
		FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
		LEFT JOIN pg_stats s ON s.schemaname = ns.nspname AND s.tablename = c.relname AND s.attname = 'status'
		WHERE c.oid = 'orders'::regclass`).Scan(&tuples, &pages, &size, &block, &vals, &freqs)
	if err != nil {
		return ms
	}
	if size <= smallOrders {
		var shipped, cancelled int64
		if c.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE status = 'SHIPPED'), count(*) FILTER (WHERE status = 'CANCELLED') FROM orders`).
			Scan(&shipped, &cancelled) == nil {
			add("SHIPPED", float64(shipped))
			add("CANCELLED", float64(cancelled))
		}
		return ms
	}
	if tuples < 0 || pages <= 0 || vals == nil {
		return ms // never analysed: nothing to estimate from
	}
	total := tuples / float64(pages) * float64(size/block)
	for _, s := range []string{"SHIPPED", "CANCELLED"} {
		f := 0.0 // not among the most common values: too rare to be sampled
		if i := slices.Index(vals, s); i >= 0 && i < len(freqs) {
			f = float64(freqs[i])
		}
		add(s, math.Round(total*f))
	}
	return ms
}

// readLag asks the broker for each local participant's group lag. A
// group the broker cannot describe right now is left out of the scrape
// rather than reported as zero.
func (c *StateCollector) readLag(ctx context.Context) []prometheus.Metric {
	if c.admin == nil || len(c.consumers) == 0 {
		return nil
	}
	groups := make([]string, 0, len(c.consumers))
	for _, cs := range c.consumers {
		groups = append(groups, cs.Group)
	}
	lags, err := c.admin.Lag(ctx, groups...)
	if err != nil {
		return nil
	}
	var ms []prometheus.Metric
	for name, cs := range c.consumers {
		l, ok := lags[cs.Group]
		if !ok || l.Error() != nil {
			continue
		}
		ms = append(ms, prometheus.MustNewConstMetric(c.lag, prometheus.GaugeValue, float64(l.Lag.Total()), name))
		for _, p := range l.Lag.Sorted() {
			if p.Err != nil {
				continue // a partition whose commit or end offset is unknown now: left out, not zero
			}
			ms = append(ms, prometheus.MustNewConstMetric(c.partitionLag, prometheus.GaugeValue, float64(p.Lag),
				name, cs.Group, p.Topic, strconv.Itoa(int(p.Partition))))
		}
	}
	return ms
}

// CountPublishError counts an outbox record the relay could not publish
// this time (it stays in the outbox and is tried again), by Kafka's error
// code: a cluster-level refusal shows here, never as parked records.
func (m *Metrics) CountPublishError(code string) {
	if m != nil {
		m.publishErrors.WithLabelValues(code).Inc()
	}
}
