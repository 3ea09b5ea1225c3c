//go:build unix

package embedded

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
)

// rootDataBase is where, as root, the PostgreSQL data goes when the postgres
// user cannot reach the data directory (a project under root's 0700 home):
// a directory of its own per data directory, linked from it.
const rootDataBase = "/var/lib/prozess"

// reachableDataDir is where the server keeps dir's data. As a user, dir
// itself. As root the server runs as the postgres user, which cannot pass
// through a private directory such as root's home: then the data lives
// under /var/lib/prozess, in a directory named after dir, and dir becomes a
// symbolic link to it, so a restart (and the user, with ls -l) finds it.
func reachableDataDir(dir string, cred *runAs, log *slog.Logger) (string, error) {
	if cred == nil {
		return dir, nil
	}
	if target, err := filepath.EvalSymlinks(dir); err == nil {
		dir = target // a link made by an earlier start, or the user's own
	}
	if canReach(filepath.Dir(dir), cred) {
		return dir, nil
	}
	if _, err := os.Lstat(dir); err == nil {
		return "", fmt.Errorf("embedded PostgreSQL: %s exists, but the postgres user (the server's, as root) cannot reach it "+
			"through its parent directories: move it, run prozess as another user, or pass --database-url", dir)
	}
	sum := sha256.Sum256([]byte(dir))
	real := filepath.Join(rootDataBase, hex.EncodeToString(sum[:8]), "postgres")
	if err := os.MkdirAll(filepath.Dir(real), 0o755); err != nil {
		return "", fmt.Errorf("embedded PostgreSQL: creating %s: %w", filepath.Dir(real), err)
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", fmt.Errorf("embedded PostgreSQL: creating %s: %w", filepath.Dir(dir), err)
	}
	if err := os.Symlink(real, dir); err != nil {
		return "", fmt.Errorf("embedded PostgreSQL: linking %s to %s: %w", dir, real, err)
	}
	log.Info("embedded PostgreSQL: the postgres user cannot reach the data directory, so its data is kept where it can (linked from the data directory)",
		"data_dir", dir, "kept_in", real)
	return real, nil
}

// canReach says whether the user can pass through dir and every directory
// above it (search permission), as the kernel will check when the server
// opens its data.
func canReach(dir string, u *runAs) bool {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if errors.Is(err, os.ErrNotExist) {
			// Made later by MkdirAll with 0755, searchable by all.
		} else if err != nil {
			return false
		} else if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			m := fi.Mode().Perm()
			switch {
			case st.Uid == u.Uid:
				if m&0o100 == 0 {
					return false
				}
			case st.Gid == u.Gid:
				if m&0o010 == 0 {
					return false
				}
			default:
				if m&0o001 == 0 {
					return false
				}
			}
		}
		if p := filepath.Dir(d); p == d {
			return true
		}
	}
}
