package embedded_test

import (
	"context"
	"log/slog"
	"net"
	neturl "net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
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

// As root, from a project under a private home (root's own is 0700), the
// server runs as the postgres user, which cannot reach the data directory:
// the data goes where it can, linked from the data directory, and a
// restart finds it again.
func TestPostgresAsRootUnderPrivateHome(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the case is root's: as any other user the server runs as that user")
	}
	if _, ok := embedded.FindBinaries(); !ok {
		t.Skip("no PostgreSQL installation: the fetched binaries do not run as root")
	}
	home := filepath.Join(t.TempDir(), "home")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(home, "shop", ".prozess", "postgres")
	log := slog.New(slog.DiscardHandler)
	start := func() *embedded.Postgres {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		pg, err := embedded.StartPostgres(t.Context(), dir, addr, "", log)
		if err != nil {
			t.Fatal(err)
		}
		return pg
	}
	pg := start()
	target, err := os.Readlink(dir)
	if err != nil {
		pg.Stop()
		t.Fatalf("the data directory is not a link to where the postgres user can reach: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(target)) })
	conn, err := pgx.Connect(t.Context(), pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(t.Context(), "CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)"); err != nil {
		t.Fatal(err)
	}
	conn.Close(t.Context())
	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	pg = start()
	defer pg.Stop()
	conn, err = pgx.Connect(t.Context(), pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(t.Context())
	var id int
	if err := conn.QueryRow(t.Context(), "SELECT id FROM kept").Scan(&id); err != nil || id != 7 {
		t.Fatalf("after a restart the data is gone: %d, %v", id, err)
	}
}

// With no address given the servers take their usual port, or a free one
// when something else holds it; a given address is kept, taken or not.
func TestChooseAddrMovesOffATakenUsualPort(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	usual := held.Addr().String()
	got, err := embedded.ChooseAddr("", usual)
	if err != nil || got == usual || !strings.HasPrefix(got, "127.0.0.1:") {
		t.Fatalf("with %s taken, chose %q (%v)", usual, got, err)
	}
	if _, err := embedded.ChooseAddr(usual, "127.0.0.1:1"); err == nil {
		t.Fatalf("a given address that is taken was accepted")
	}
	held.Close()
	if got, err := embedded.ChooseAddr("", usual); err != nil || got != usual {
		t.Fatalf("with %s free, chose %q (%v)", usual, got, err)
	}
}

// The embedded server is nobody's to walk into: logins need the generated
// password, which prozess records beside the data (readable by its user
// only) and finds again at the next start.
func TestPostgresNeedsItsGeneratedPassword(t *testing.T) {
	if _, ok := embedded.FindBinaries(); !ok && os.Geteuid() == 0 {
		t.Skip("no PostgreSQL installation: the fetched binaries do not run as root")
	}
	dir := filepath.Join(reachableDir(t), "postgres")
	addr := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}
	log := slog.New(slog.DiscardHandler)
	pg, err := embedded.StartPostgres(t.Context(), dir, addr(), "", log)
	if err != nil {
		t.Fatal(err)
	}
	url := pg.URL("postgres")
	u, err := neturl.Parse(url)
	if err != nil {
		t.Fatal(err)
	}
	pass, ok := u.User.Password()
	if !ok || len(pass) < 32 {
		t.Fatalf("the URL carries no generated password: %s", u.Redacted())
	}
	fi, err := os.Stat(dir + ".password")
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("password file: %v %v", fi, err)
	}
	for _, wrong := range []string{"", "postgres"} {
		w := *u
		w.User = neturl.UserPassword("postgres", wrong)
		if conn, err := pgx.Connect(t.Context(), w.String()); err == nil {
			conn.Close(t.Context())
			t.Fatalf("logged in with password %q", wrong)
		}
	}
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close(t.Context())
	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	pg, err = embedded.StartPostgres(t.Context(), dir, addr(), "", log)
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	defer pg.Stop()
	u2, _ := neturl.Parse(pg.URL("postgres"))
	if p2, _ := u2.User.Password(); p2 != pass {
		t.Fatal("the restarted server has another password")
	}
}

// reachableDir is a fresh directory, removed when the test ends, that the
// postgres user can reach when the tests run as root.
func reachableDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "prozess-embedded-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
