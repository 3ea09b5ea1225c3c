//go:build unix && !linux

package embedded

import "syscall"

// serverProcAttr runs the server in its own process group (the terminal's
// Ctrl-C goes to prozess, which stops the server after its actors), as cred
// when set.
func serverProcAttr(cred *runAs) *syscall.SysProcAttr {
	var c *syscall.Credential
	if cred != nil {
		c = &syscall.Credential{Uid: cred.Uid, Gid: cred.Gid}
	}
	return &syscall.SysProcAttr{Setpgid: true, Credential: c}
}
