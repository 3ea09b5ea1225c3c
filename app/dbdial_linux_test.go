package app

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"

	"github.com/prozess/prozess/schema/schematest"
)

// Every connection to PostgreSQL, the pool's and one made from its
// config as the relay's lease and the api's LISTEN are, carries the
// keepalives and the user timeout that notice a vanished host in seconds
// (dbdial.go), read back from the kernel. What the kernel then does with
// them, end a connection whose peer is gone, is
// TestVanishedDatabaseHostIsNoticedInSeconds.
func TestDatabaseConnectionsNoticeADeadHost(t *testing.T) {
	t.Parallel()
	url := schematest.NewDatabase(t) // sslmode=disable: the net.Conn is the TCP one
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := OpenDB(ctx, url, 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	pooled, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer pooled.Release()
	lease, err := pgx.ConnectConfig(ctx, pool.Config().ConnConfig.Copy())
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Close(context.Background())

	for name, conn := range map[string]net.Conn{"pooled": pooled.Conn().PgConn().Conn(), "lease": lease.PgConn().Conn()} {
		tcp, ok := conn.(*net.TCPConn)
		if !ok {
			t.Fatalf("%s connection is a %T, want *net.TCPConn", name, conn)
		}
		raw, err := tcp.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]struct{ level, opt, value int }{
			"SO_KEEPALIVE":     {unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
			"TCP_KEEPIDLE":     {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(dbKeepAliveIdle.Seconds())},
			"TCP_KEEPINTVL":    {unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(dbKeepAliveInterval.Seconds())},
			"TCP_KEEPCNT":      {unix.IPPROTO_TCP, unix.TCP_KEEPCNT, dbKeepAliveCount},
			"TCP_USER_TIMEOUT": {unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(dbUserTimeout.Milliseconds())},
		}
		for opt, w := range want {
			var got int
			var gerr error
			if err := raw.Control(func(fd uintptr) { got, gerr = unix.GetsockoptInt(int(fd), w.level, w.opt) }); err != nil || gerr != nil {
				t.Fatalf("%s %s: %v %v", name, opt, err, gerr)
			}
			if got != w.value {
				t.Errorf("%s connection: %s = %d, want %d", name, opt, got, w.value)
			}
		}
	}
}
