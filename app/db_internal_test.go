package app

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"
)

// A process that cannot reach any server of a multi-host URL (a primary
// and its standby, mid-failover) names every one, once, in its one-line
// error: naming the first alone would send an operator to the wrong
// server.
func TestUnreachableMultiHostURLNamesEveryHost(t *testing.T) {
	t.Parallel()
	var addrs []string
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, ln.Addr().String())
		ln.Close() // nothing listens there now
	}
	for _, sslmode := range []string{"disable", "prefer"} { // prefer: pgx tries each host twice
		url := fmt.Sprintf("postgres://prozess@%s/prozess?sslmode=%s&connect_timeout=5&target_session_attrs=read-write", strings.Join(addrs, ","), sslmode)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := OpenDB(ctx, url, 0, slog.New(slog.DiscardHandler))
		cancel()
		if err == nil {
			t.Fatalf("OpenDB(%s) connected to nothing", url)
		}
		want := "cannot reach PostgreSQL at " + strings.Join(addrs, ",") + ":"
		if !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("sslmode=%s: %q, want one line starting %q", sslmode, err, want)
		}
	}
}
