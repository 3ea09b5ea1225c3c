// Package embedded starts the servers prozess needs on a machine that has
// none running: a real PostgreSQL server (from the machine's installation,
// or from binaries fetched once into a cache) and an in-process Redis. It is
// what lets `prozess serve all` and `prozess dev` work with nothing but Go;
// production passes --database-url and --redis-addr and starts none of it.
package embedded

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	embeddedpostgres "github.com/fergusstrange/embedded-postgres"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Postgres is a PostgreSQL server this process started and stops.
type Postgres struct {
	host string
	port int
	user string
	pass string
	log  *slog.Logger
	stop func() error
}

// StartPostgres starts a PostgreSQL server with its data in dir (created
// with initdb the first time, kept afterwards, so a restart keeps every
// order) listening on addr, and returns once it accepts connections. It uses
// the machine's PostgreSQL when it finds one, and otherwise fetches
// binaries once into cacheDir. As root it runs the server as the postgres
// system user, since PostgreSQL refuses to run as root.
//
// An empty addr means UsualPostgresAddr, or a free port on its host when
// that is taken (a PostgreSQL of the machine's own, usually); a given addr
// that is taken is an error naming the flag.
func StartPostgres(ctx context.Context, dir, addr, cacheDir string, log *slog.Logger) (*Postgres, error) {
	if addr == "" {
		a, err := ChooseAddr("", UsualPostgresAddr)
		if err != nil {
			return nil, fmt.Errorf("embedded PostgreSQL: no free port on 127.0.0.1: %w", err)
		}
		if a != UsualPostgresAddr {
			log.Info("embedded PostgreSQL: the usual address is taken, using a free port", "usual", UsualPostgresAddr, "addr", a)
		}
		addr = a
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("embedded PostgreSQL address %q: want host:port", addr)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port <= 0 || port > 65535 {
		return nil, fmt.Errorf("embedded PostgreSQL address %q: want a port from 1 to 65535", addr)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	if err := portFree(host, port); err != nil {
		return nil, err
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	p := &Postgres{host: host, port: port, user: "postgres", log: log}
	start := time.Now()
	var cred *runAs
	bin, local := FindBinaries()
	if local {
		if cred, err = serverUser(); err != nil {
			return nil, err
		}
		if dir, err = reachableDataDir(dir, cred, log); err != nil {
			return nil, err
		}
	}
	set, err := p.readPassword(dir)
	if err != nil {
		return nil, err
	}
	if local {
		err = p.startLocal(ctx, bin, dir, cred)
	} else {
		err = p.startFetched(ctx, dir, cacheDir)
	}
	if err == nil && !set {
		err = p.setPassword(ctx, dir, cred)
	}
	if err != nil {
		_ = p.Stop()
		return nil, err
	}
	log.Info("embedded PostgreSQL started", "addr", net.JoinHostPort(host, portStr), "data_dir", dir, "took", time.Since(start).Round(time.Millisecond))
	return p, nil
}

// URL is the connection URL of database on this server.
func (p *Postgres) URL(database string) string {
	auth := p.user
	if p.pass != "" {
		auth += ":" + p.pass
	}
	return fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", auth, net.JoinHostPort(p.host, strconv.Itoa(p.port)), database)
}

// Stop shuts the server down (a fast shutdown: open sessions are ended,
// everything committed is on disk) and waits for it to exit.
func (p *Postgres) Stop() error {
	if p.stop == nil {
		return nil
	}
	err := p.stop()
	p.stop = nil
	if err != nil {
		return fmt.Errorf("stopping embedded PostgreSQL: %w", err)
	}
	p.log.Info("embedded PostgreSQL stopped")
	return nil
}

// portFree fails with one line naming the flag if something already
// listens on host:port.
func portFree(host string, port int) error {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("embedded PostgreSQL cannot listen on %s:%d (a PostgreSQL already running there?): "+
			"pass --database-url to use that server, or move the embedded one with --embedded-postgres-addr", host, port)
	}
	return ln.Close()
}

// FindBinaries returns the directory of the machine's PostgreSQL server
// binaries (initdb and postgres): PROZESS_POSTGRES_BIN, pg_config
// --bindir, the PATH, then the usual install locations, newest first.
func FindBinaries() (string, bool) {
	has := func(dir string) bool {
		for _, b := range []string{"initdb", "postgres"} {
			if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.IsDir() {
				return false
			}
		}
		return true
	}
	var candidates []string
	if d := os.Getenv("PROZESS_POSTGRES_BIN"); d != "" {
		return d, has(d)
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		candidates = append(candidates, strings.TrimSpace(string(out)))
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			candidates = append(candidates, filepath.Dir(r))
		}
	}
	for _, pattern := range []string{
		"/usr/lib/postgresql/*/bin",          // Debian, Ubuntu
		"/usr/pgsql-*/bin",                   // RHEL, Fedora (PGDG)
		"/usr/local/pgsql/bin",               // built from source
		"/opt/homebrew/opt/postgresql@*/bin", // Homebrew, Apple silicon
		"/usr/local/opt/postgresql@*/bin",    // Homebrew, Intel
		"/Applications/Postgres.app/Contents/Versions/*/bin",
	} {
		m, _ := filepath.Glob(pattern)
		slices.SortFunc(m, func(a, b string) int { return versionOf(b) - versionOf(a) })
		candidates = append(candidates, m...)
	}
	for _, c := range candidates {
		if has(c) {
			return c, true
		}
	}
	return "", false
}

// versionOf reads the major version in an install path, for newest first.
func versionOf(path string) int {
	for _, part := range strings.FieldsFunc(path, func(r rune) bool { return r < '0' || r > '9' }) {
		if n, err := strconv.Atoi(part); err == nil {
			return n
		}
	}
	return 0
}

// startLocal runs the machine's binaries directly: initdb on first use,
// then the postmaster as a child process in its own process group, so the
// terminal's Ctrl-C reaches prozess, which stops the server last, after
// every actor that uses it.
func (p *Postgres) startLocal(ctx context.Context, bin, dir string, cred *runAs) error {
	if _, err := os.Stat(filepath.Join(dir, "PG_VERSION")); err != nil {
		if err := p.initdb(ctx, bin, dir, cred); err != nil {
			return err
		}
	}
	logPath := filepath.Join(dir, "server.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("embedded PostgreSQL log %s: %w", logPath, err)
	}
	defer logFile.Close() // the child has its own copy
	if cred != nil {
		_ = os.Chown(logPath, int(cred.Uid), int(cred.Gid))
	}
	cmd := exec.Command(filepath.Join(bin, "postgres"), "-D", dir,
		"-c", "listen_addresses="+p.host, "-p", strconv.Itoa(p.port),
		"-c", "unix_socket_directories=", // TCP only: no socket path to collide or grow too long
		"-c", "max_connections=200")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = serverProcAttr(cred)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting embedded PostgreSQL (%s): %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	p.stop = func() error { return stopProcess(cmd.Process, exited) }
	if err := p.waitReady(ctx, exited, dir); err != nil {
		_ = p.stop()
		p.stop = nil
		return err
	}
	return nil
}

// initdb creates the cluster: user postgres, UTF-8, trust authentication
// only until setPassword, right after the first start, makes every login
// need the generated password.
func (p *Postgres) initdb(ctx context.Context, bin, dir string, cred *runAs) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating embedded PostgreSQL data directory %s: %w", dir, err)
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return fmt.Errorf("giving %s to the postgres user: %w", dir, err)
		}
	}
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "initdb"), "-D", dir, "-U", p.user, "-A", "trust", "-E", "UTF8", "--locale=C")
	cmd.SysProcAttr = serverProcAttr(cred)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		hint := ""
		if cred != nil {
			hint = " (as root the server runs as the postgres user, which must be able to reach " + dir + ")"
		}
		return fmt.Errorf("initdb %s failed%s: %s", dir, hint, lastLine(out.String(), err))
	}
	return nil
}

// waitReady waits until the server accepts connections, or fails with the
// last line of its log if it exits first.
func (p *Postgres) waitReady(ctx context.Context, exited <-chan error, dir string) error {
	logPath := filepath.Join(dir, "server.log")
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		conn, err := pgx.Connect(ctx, p.URL("postgres"))
		if err == nil {
			return conn.Close(ctx)
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && (pgErr.Code == "28P01" || pgErr.Code == "28000") {
			return fmt.Errorf("embedded PostgreSQL refuses prozess's login (its password, in %s, was removed or changed?): "+
				"put it back, or remove the data directory to start afresh", passwordFile(dir))
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("embedded PostgreSQL exited at start: %s", lastLine(string(b), err))
		case <-ctx.Done():
			return fmt.Errorf("embedded PostgreSQL did not accept connections within a minute (log: %s)", logPath)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stopProcess asks the postmaster for a fast shutdown (SIGINT), then an
// immediate one (SIGQUIT), then kills it.
func stopProcess(proc *os.Process, exited <-chan error) error {
	for _, step := range []struct {
		sig  os.Signal
		wait time.Duration
	}{{os.Interrupt, 30 * time.Second}, {syscall.SIGQUIT, 5 * time.Second}, {os.Kill, 5 * time.Second}} {
		if err := proc.Signal(step.sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return err
		}
		select {
		case <-exited:
			return nil
		case <-time.After(step.wait):
		}
	}
	return errors.New("the server did not exit")
}

// serverUser is who the server runs as: this user, or the postgres system
// user when this is root.
func serverUser() (*runAs, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, errors.New("prozess runs as root and PostgreSQL refuses to: create a postgres system user " +
			"(useradd --system postgres), run prozess as another user, or pass --database-url")
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &runAs{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// runAs is the system user a server process runs as.
type runAs struct{ Uid, Gid uint32 }

// startFetched uses embedded-postgres, which fetches PostgreSQL's binaries
// from Maven Central once into cacheDir and runs them; it cannot run as
// root.
func (p *Postgres) startFetched(ctx context.Context, dir, cacheDir string) error {
	if os.Geteuid() == 0 {
		return errors.New("no PostgreSQL installation found, and the fetched binaries cannot run as root: " +
			"install PostgreSQL (e.g. apt-get install postgresql), set PROZESS_POSTGRES_BIN to its bin directory, or pass --database-url")
	}
	if cacheDir == "" {
		c, err := os.UserCacheDir()
		if err != nil {
			return fmt.Errorf("no cache directory for PostgreSQL binaries: %w", err)
		}
		cacheDir = filepath.Join(c, "prozess")
	}
	version := embeddedpostgres.V16
	if p.pass == "" {
		// The first start: initdb sets this one; setPassword then records
		// it and makes every login need it.
		p.pass = newPassword()
	}
	var out bytes.Buffer
	db := embeddedpostgres.NewDatabase(embeddedpostgres.DefaultConfig().
		Version(version).
		Port(uint32(p.port)).
		Username(p.user).Password(p.pass).Database("postgres").
		DataPath(dir).
		RuntimePath(dir + ".run").
		CachePath(cacheDir).
		BinariesPath(filepath.Join(cacheDir, "postgres-"+string(version))).
		StartParameters(map[string]string{"listen_addresses": p.host, "max_connections": "200"}).
		StartTimeout(2 * time.Minute).
		Logger(&out))
	p.log.Info("no PostgreSQL installation found; using PostgreSQL binaries from Maven Central (fetched once into the cache)",
		"version", string(version), "cache", cacheDir)
	if err := db.Start(); err != nil {
		return fmt.Errorf("starting embedded PostgreSQL with fetched binaries (pass --database-url to use a server of yours): %s", oneLine(err.Error()))
	}
	p.stop = db.Stop
	return nil
}

// passwordFile holds the superuser's password of the server whose data is
// in dir, readable by this user only. Without a password every local user
// (and anything that can reach the port) would be the database's
// superuser; with it, only whoever can read this file, or the record of
// where the servers listen (servers.json, likewise private), gets in.
func passwordFile(dir string) string { return dir + ".password" }

// readPassword takes the recorded password, if the server has one yet.
func (p *Postgres) readPassword(dir string) (bool, error) {
	b, err := os.ReadFile(passwordFile(dir))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("embedded PostgreSQL: reading its password: %w", err)
	}
	p.pass = strings.TrimSpace(string(b))
	return p.pass != "", nil
}

func newPassword() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b) // crypto/rand never fails on Linux
	return hex.EncodeToString(b)
}

// setPassword gives the superuser a generated password (or keeps the one
// initdb set), records it, and then allows password logins only. It runs
// on a server's first start, and once on a data directory an older prozess
// made with trust logins. The password is recorded before the server asks
// for it, so a stop between the steps never locks prozess out.
func (p *Postgres) setPassword(ctx context.Context, dir string, cred *runAs) error {
	conn, err := pgx.Connect(ctx, p.URL("postgres"))
	if err != nil {
		return fmt.Errorf("embedded PostgreSQL: %w", err)
	}
	defer conn.Close(ctx)
	if p.pass == "" {
		p.pass = newPassword()
	}
	tmp := passwordFile(dir) + ".tmp"
	if err := os.WriteFile(tmp, []byte(p.pass+"\n"), 0o600); err != nil {
		return fmt.Errorf("embedded PostgreSQL: recording its password: %w", err)
	}
	if err := os.Rename(tmp, passwordFile(dir)); err != nil {
		return fmt.Errorf("embedded PostgreSQL: recording its password: %w", err)
	}
	if _, err := conn.Exec(ctx, "SET password_encryption = 'scram-sha-256'"); err != nil {
		return fmt.Errorf("embedded PostgreSQL: %w", err)
	}
	if _, err := conn.Exec(ctx, "ALTER ROLE "+pgx.Identifier{p.user}.Sanitize()+" PASSWORD "+quoteLiteral(p.pass)); err != nil {
		return fmt.Errorf("embedded PostgreSQL: setting the password: %w", err)
	}
	hba := filepath.Join(dir, "pg_hba.conf")
	rules := "# prozess: password logins only; the password is in " + passwordFile(dir) + "\n" +
		"host all all all scram-sha-256\n"
	if err := os.WriteFile(hba, []byte(rules), 0o600); err != nil {
		return fmt.Errorf("embedded PostgreSQL: writing pg_hba.conf: %w", err)
	}
	if cred != nil {
		if err := os.Chown(hba, int(cred.Uid), int(cred.Gid)); err != nil {
			return fmt.Errorf("embedded PostgreSQL: giving pg_hba.conf to the postgres user: %w", err)
		}
	}
	if _, err := conn.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return fmt.Errorf("embedded PostgreSQL: reloading pg_hba.conf: %w", err)
	}
	p.log.Info("embedded PostgreSQL: logins need the generated password now", "password_file", passwordFile(dir))
	return nil
}

// quoteLiteral quotes a string for SQL; the passwords are hex, the quoting
// is for safety's sake.
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// lastLine picks the line of a server's output that says what went wrong:
// the last FATAL or ERROR line, else the last line.
func lastLine(out string, err error) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], "FATAL") || strings.Contains(lines[i], "ERROR") {
			return strings.TrimSpace(lines[i])
		}
	}
	if l := strings.TrimSpace(lines[len(lines)-1]); l != "" {
		return l
	}
	if err != nil {
		return err.Error()
	}
	return "no output"
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
