package statuscache_test

import (
	"context"
	"errors"
	"net"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/rueidis"

	"github.com/prozess/prozess/modules/event"
	"github.com/prozess/prozess/modules/statuscache"
	"github.com/prozess/prozess/schema/schematest"
)

// hungRedis starts a redis-server of the test's own on a free port (never
// the machine's), connects to it as prozess does, and returns the client
// and the server, which the test may SIGSTOP.
func hungRedis(t *testing.T) (rueidis.Client, *exec.Cmd) {
	t.Helper()
	addr, cmd := schematest.RedisServer(t, "--port")
	// The options of app.OpenRedis.
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true,
		ConnWriteTimeout: 5 * time.Second, Dialer: net.Dialer{Timeout: 5 * time.Second}, ForceSingleClient: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	return rdb, cmd
}

// With Redis hung, a reader bounded at 150 ms gets its answer (an error)
// by then, although a writer with a longer bound (the status writer's 1 s)
// is redialling on the same client meanwhile; and once one call has found
// Redis hung, the next ones are skipped at once. Before, the reader waited
// for the writer's redial: about 1 s.
func TestHungRedisCostsAReaderItsOwnBound(t *testing.T) {
	rdb, redis := hungRedis(t)
	writer := statuscache.New(rdb, "guardtest:")
	id := uuid.New()
	ctx := context.Background()
	if err := writer.Advance(ctx, []statuscache.Update{{OrderID: id, Status: event.StatusCreated}}); err != nil {
		t.Fatal(err)
	}
	if err := redis.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the status writer, 1 s per batch
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			wctx, cancel := context.WithTimeout(ctx, time.Second)
			writer.Advance(wctx, []statuscache.Update{{OrderID: id, Status: event.StatusShipped}})
			cancel()
		}
	}()
	defer func() { close(stop); redis.Process.Signal(syscall.SIGCONT); wg.Wait() }()

	// Each read with a guard of its own, as the first read after a
	// cooldown is: it must end by its deadline, redial or not.
	var worst time.Duration
	for i := range 20 {
		rctx, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
		start := time.Now()
		_, _, err := statuscache.New(rdb, "guardtest:").Get(rctx, id)
		took := time.Since(start)
		cancel()
		if err == nil {
			t.Fatalf("read %d answered with Redis stopped", i)
		}
		worst = max(worst, took)
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("20 reads with Redis hung: slowest %s", worst.Round(time.Millisecond))
	if worst > 250*time.Millisecond {
		t.Errorf("a read bounded at 150ms took %s with Redis hung", worst)
	}
	// One guard: once a read found Redis hung, the next is skipped at once.
	reader := statuscache.New(rdb, "guardtest:")
	rctx, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
	_, _, err := reader.Get(rctx, id)
	cancel()
	if err == nil {
		t.Fatal("read answered with Redis stopped")
	}
	start := time.Now()
	if _, _, err := reader.Get(ctx, id); !errors.Is(err, statuscache.ErrSkipped) || time.Since(start) > 20*time.Millisecond {
		t.Errorf("the read after one that found Redis hung: %v after %s, want skipped at once", err, time.Since(start))
	}
}
