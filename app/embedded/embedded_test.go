package embedded_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/prozess/prozess/app/embedded"
)

// Keys expire in real time, as in a real Redis: the status cache relies on
// it to heal.
func TestRedisExpiresKeysInRealTime(t *testing.T) {
	r, err := embedded.StartRedis("127.0.0.1:0", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{r.Addr()}, DisableCache: true, ForceSingleClient: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	ctx := context.Background()
	if err := rdb.Do(ctx, rdb.B().Set().Key("k").Value("v").Px(300*time.Millisecond).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := rdb.Do(ctx, rdb.B().Exists().Key("k").Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a key with a 300ms lifetime still exists after 5s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A second process on the same data directory is refused, with the flag to
// change in the message.
func TestLockDataDir(t *testing.T) {
	dir := t.TempDir()
	unlock, err := embedded.LockDataDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := embedded.LockDataDir(dir); err == nil {
		t.Fatal("a second lock on the same data directory succeeded")
	} else if want := "--data-dir " + dir + " is in use"; !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not say %q", err, want)
	}
	unlock()
	again, err := embedded.LockDataDir(dir)
	if err != nil {
		t.Fatalf("after unlocking: %v", err)
	}
	again()
}
