package app

import (
	"net"
	"time"
)

// A dead database host must be noticed in seconds, not by the kernel's
// defaults: a connection whose peer vanished (power lost, a network
// partition, a failover whose old primary's host is gone rather than
// restarted) resets nothing, so a query waiting for its answer or a
// session waiting on LISTEN or an advisory lock would wait ~15 minutes of
// TCP retransmissions (data in flight) or ~2.5 minutes of Go's default
// keepalives (idle), holding the relay, the api's key revocations or a
// consumer's partition meanwhile. These are libpq's keepalives_idle,
// keepalives_interval, keepalives_count and tcp_user_timeout, which pgx
// does not parse from a URL.
const (
	dbKeepAliveIdle     = 10 * time.Second
	dbKeepAliveInterval = 5 * time.Second
	dbKeepAliveCount    = 3
	// dbUserTimeout bounds how long sent data (or a keepalive probe) may
	// go unacknowledged before the kernel ends the connection. A slow
	// query is no such case: the server's kernel acknowledges the bytes
	// at once, whatever the server does with them.
	dbUserTimeout = 30 * time.Second
)

// dbDialer dials PostgreSQL with those bounds (the user timeout where the
// platform has one: Linux).
func dbDialer() *net.Dialer {
	return &net.Dialer{
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: dbKeepAliveIdle, Interval: dbKeepAliveInterval, Count: dbKeepAliveCount},
		Control:         setUserTimeout(dbUserTimeout),
	}
}
