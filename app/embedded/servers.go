package embedded

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/gofrs/flock"
)

// Servers is where the servers of a running `serve all`, `dev` or `broker`
// listen, recorded in its data directory. The embedded servers move to a
// free port when their usual one is taken (a developer's own PostgreSQL on
// 5432 is common), so the other commands cannot assume the usual ports:
// with no address given they read this record instead, and never fall
// through to whatever else listens there.
type Servers struct {
	PID          int      `json:"pid"`
	DatabaseURL  string   `json:"database_url,omitempty"`
	RedisAddr    string   `json:"redis_addr,omitempty"`
	KafkaBrokers []string `json:"kafka_brokers,omitempty"`
}

// serversFile is the record's name in the data directory.
const serversFile = "servers.json"

// ErrNotRunning says that no serve all, dev or broker holds the data
// directory, so whatever its record says is gone.
var ErrNotRunning = errors.New("no prozess serve all, dev or broker is running")

// WriteServers records s in dir (the caller holds dir's lock, see
// LockDataDir), atomically, readable by this user only: the record is read
// by the same user's other commands.
func WriteServers(dir string, s Servers) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, serversFile+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("recording the servers in %s: %w", dir, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, serversFile)); err != nil {
		return fmt.Errorf("recording the servers in %s: %w", dir, err)
	}
	return nil
}

// RemoveServers deletes the record, at a clean stop.
func RemoveServers(dir string) {
	_ = os.Remove(filepath.Join(dir, serversFile))
}

// ReadServers returns what the process holding dir recorded. It fails with
// ErrNotRunning when no process holds dir's lock: a record left by a process
// that was killed names servers that are gone, and ports another program
// may have taken since.
func ReadServers(dir string) (Servers, error) {
	var s Servers
	b, err := os.ReadFile(filepath.Join(dir, serversFile))
	if errors.Is(err, os.ErrNotExist) {
		return s, fmt.Errorf("%w with --data-dir %s (it records no servers)", ErrNotRunning, dir)
	}
	if err != nil {
		return s, fmt.Errorf("reading the servers recorded in %s: %w", dir, err)
	}
	l := flock.New(filepath.Join(dir, "lock"))
	free, err := l.TryLock()
	if err != nil {
		return s, fmt.Errorf("--data-dir %s: checking its lock: %w", dir, err)
	}
	if free {
		_ = l.Unlock()
		return s, fmt.Errorf("%w with --data-dir %s (the servers it records have stopped)", ErrNotRunning, dir)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("reading the servers recorded in %s: %w", dir, err)
	}
	return s, nil
}

// Listen listens on addr when one is given (taken is an error for the
// caller to name with its flag), else on the usual address, else, when that
// is taken, on a free port of the same host.
func Listen(addr, usual string) (net.Listener, error) {
	if addr != "" {
		return net.Listen("tcp", addr)
	}
	if ln, err := net.Listen("tcp", usual); err == nil {
		return ln, nil
	}
	host, _, err := net.SplitHostPort(usual)
	if err != nil {
		return nil, err
	}
	return net.Listen("tcp", net.JoinHostPort(host, "0"))
}

// ChooseAddr is Listen for a server that must be given a port number
// rather than a listener (PostgreSQL): it can lose the free port to another
// program before it binds, and then fails to start with the port named.
func ChooseAddr(addr, usual string) (string, error) {
	ln, err := Listen(addr, usual)
	if err != nil {
		return "", err
	}
	a := ln.Addr().String()
	return a, ln.Close()
}

// The usual addresses of the embedded servers: where `serve all` and `dev`
// put them when that port is free.
const (
	UsualPostgresAddr = "127.0.0.1:5432"
	UsualRedisAddr    = "127.0.0.1:6379"
	UsualKafkaAddr    = "127.0.0.1:9092"
)
