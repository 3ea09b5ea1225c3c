package embedded

import "syscall"

// serverProcAttr: Windows has neither process groups for Ctrl-C in this
// sense nor root; the server runs as this user.
func serverProcAttr(*runAs) *syscall.SysProcAttr { return nil }
