package app_test

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/app/check"
	"github.com/prozess/prozess/schema/schematest"
)

// Zombies: three instances of every participant share the partitions (one
// in-process, two processes); one process is SIGSTOPped for longer than
// the session timeout while orders flow, so the group hands its partitions
// on, then resumed where it stopped (mid-batch or mid-poll), and at the end
// stopped. No order is lost or doubled (prozess check), and no committed
// offset of any group ever goes backwards, neither when the zombie resumes
// nor when it stops.
func TestZombieParticipantRewindsNoOffset(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	cfg.Partitions = 6
	main := e.start(cfg) // every participant, and the api
	env := []string{
		"PROZESS_DATABASE_URL=" + e.dbURL,
		"PROZESS_REDIS_ADDR=" + schematest.RedisAddr(t),
		"PROZESS_REDIS_PREFIX=" + e.prefix,
		"PROZESS_KAFKA_BROKERS=" + strings.Join(cfg.KafkaBrokers, ","),
		"PROZESS_TOPIC=" + cfg.Topic, "PROZESS_GROUP_PREFIX=" + cfg.GroupPrefix, "PROZESS_PARTITIONS=6",
		"PROZESS_LOG_FORMAT=json", "PROZESS_RATE_LIMIT=0", "PROZESS_ADMIN_ADDR=127.0.0.1:0",
		"PROZESS_PAYMENT_DECLINE_RATE=0",
	}
	participants := []string{"serve", "inventory", "payment", "delivery", "status"}
	zombie := spawn(t, env, participants...)
	zombie.ready(t)
	other := spawn(t, env, participants...)
	other.ready(t)

	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.KafkaBrokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	var groups []string
	for _, p := range app.Participants()[1:] { // the api consumes nothing
		groups = append(groups, cfg.GroupPrefix+p)
	}
	for _, g := range groups {
		start := time.Now()
		for groupMembers(t, adm, g) != 3 {
			if time.Since(start) > 60*time.Second {
				t.Fatalf("group %s not stable with 3 members within 60s", g)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	w := newOffsetWatch(t, cfg.KafkaBrokers, cfg.Topic, groups)

	var accepted []uuid.UUID
	place := func(d time.Duration) {
		for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
			accepted = append(accepted, main.order(t, "u1", "", mouse(1)).OrderID)
		}
	}
	place(5 * time.Second)
	if err := zombie.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stoppedAt := time.Now()
	place(15 * time.Second) // > the 10s session timeout
	if err := zombie.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	t.Logf("zombie frozen for %s", time.Since(stoppedAt).Round(100*time.Millisecond))
	place(10 * time.Second)
	settled := time.Now()
	for _, id := range accepted {
		main.await(t, id.String(), 60*time.Second)
	}
	t.Logf("%d orders, all finished %s after the last was placed", len(accepted), time.Since(settled).Round(10*time.Millisecond))
	zombie.stop(t)
	other.stop(t)
	if rewinds := w.halt(); len(rewinds) > 0 {
		t.Errorf("committed offsets went backwards: %v", rewinds)
	}
	rdb, _ := schematest.NewRedis(t)
	rep, err := check.Run(t.Context(), e.pool, check.Config{Deadline: 30 * time.Second, Redis: rdb, Prefix: e.prefix})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Violations) > 0 {
		t.Errorf("prozess check after the zombie:\n%s", rep.Text())
	}
	if n := e.count(`SELECT count(*) FROM shipments`); n != int64(len(accepted)) {
		t.Errorf("%d shipments for %d orders", n, len(accepted))
	}
}
