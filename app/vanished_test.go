package app_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	neturl "net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/prozess/prozess/app"
	"github.com/prozess/prozess/schema/schematest"
)

// dropPort makes the kernel drop every packet to and from a TCP port of
// this machine (nftables, a table of the test's own, removed when the
// test ends): a host that vanished, as opposed to a process that died,
// whose kernel would reset the connections. Without nft or root it skips
// and says so, unless PROZESS_REQUIRE_NFT=1 (CI), where it fails.
func dropPort(t *testing.T, port string) {
	t.Helper()
	nft, err := exec.LookPath("nft")
	if err == nil && os.Geteuid() != 0 {
		err = fmt.Errorf("nft needs root")
	}
	if err != nil {
		msg := fmt.Sprintf("dropping packets needs nftables and root (apt-get install nftables, as .ci/services does): %v", err)
		if os.Getenv("PROZESS_REQUIRE_NFT") == "1" {
			t.Fatal(msg + "; PROZESS_REQUIRE_NFT=1 requires it")
		}
		t.Skip(msg)
	}
	table := "prozess_test_" + strings.ReplaceAll(uuid.NewString()[:8], "-", "")
	script := fmt.Sprintf(`table inet %[1]s {
	chain out {
		type filter hook output priority 0; policy accept;
		tcp dport %[2]s drop
		tcp sport %[2]s drop
	}
}
`, table, port)
	cmd := exec.Command(nft, "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v\n%s\n%s", err, out, script)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(nft, "delete", "table", "inet", table).CombinedOutput(); err != nil {
			t.Errorf("removing nft table %s: %v %s", table, err, out)
		}
	})
}

// A database host that vanishes (every packet dropped, nothing reset)
// ends prozess's connections to it in well under a minute, both a query
// waiting for its answer (the relay's, a consumer's) and an idle session
// waiting on LISTEN (the api's key revocations): the keepalives and
// TCP_USER_TIMEOUT of app/dbdial.go. With the kernel's defaults the
// query would wait ~15 minutes of retransmissions and the session ~2.5
// minutes of Go's keepalives, and a failover to a standby would not be
// followed meanwhile. Seen failing without the dialer: both still waiting
// at the test's 90 s bound.
//
// The host is toxiproxy's port in front of the test's database, whose
// packets nftables drops; the database itself stays reachable to others.
func TestVanishedDatabaseHostIsNoticedInSeconds(t *testing.T) {
	t.Parallel()
	dbURL, err := neturl.Parse(schematest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	proxy := newCutter(t, dbURL.Host)
	dbURL.Host = proxy.addr(dbURL.Host)
	_, port, _ := net.SplitHostPort(dbURL.Host)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := app.OpenDB(ctx, dbURL.String(), 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	querying, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer querying.Release()
	listening, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer listening.Release()
	if _, err := listening.Exec(ctx, `LISTEN prozess_test_vanished`); err != nil {
		t.Fatal(err)
	}

	const bound = 90 * time.Second
	wait, stop := context.WithTimeout(context.Background(), bound)
	defer stop()
	type ended struct {
		took time.Duration
		err  error
	}
	var idle ended
	var wg sync.WaitGroup
	wg.Add(1)
	start := time.Now()
	go func() {
		defer wg.Done()
		_, err := listening.Conn().WaitForNotification(wait)
		idle = ended{time.Since(start), err}
	}()
	time.Sleep(200 * time.Millisecond) // the session is idle, waiting
	dropPort(t, port)
	cutAt := time.Now()
	_, err = querying.Exec(wait, `SELECT 1`)
	inFlight := ended{time.Since(cutAt), err}
	wg.Wait()
	t.Logf("host vanished: a query in flight ended after %s (%v); an idle LISTEN session after %s (%v)",
		inFlight.took.Round(100*time.Millisecond), inFlight.err, idle.took.Round(100*time.Millisecond), idle.err)
	for what, e := range map[string]ended{"a query in flight": inFlight, "an idle LISTEN session": idle} {
		switch {
		case e.err == nil:
			t.Errorf("%s: answered, through a host that drops every packet", what)
		case wait.Err() != nil && e.took >= bound-time.Second:
			t.Errorf("%s still waiting after %s: the dead host went unnoticed", what, bound)
		case e.took > 60*time.Second:
			t.Errorf("%s ended after %s, want within a minute", what, e.took)
		}
	}
}
