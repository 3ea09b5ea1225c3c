//go:build !linux

package app

import (
	"syscall"
	"time"
)

// setUserTimeout does nothing where TCP_USER_TIMEOUT is not to be had:
// the keepalives alone bound an idle connection there.
func setUserTimeout(time.Duration) func(network, address string, c syscall.RawConn) error {
	return nil
}
