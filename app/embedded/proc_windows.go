package embedded

import (
	"log/slog"
	"syscall"
)

// serverProcAttr: Windows has neither process groups for Ctrl-C in this
// sense nor root; the server runs as this user.
func serverProcAttr(*runAs) *syscall.SysProcAttr { return nil }

// reachableDataDir is dir: the root case it handles elsewhere is Unix's.
func reachableDataDir(dir string, _ *runAs, _ *slog.Logger) (string, error) { return dir, nil }
