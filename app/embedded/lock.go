package embedded

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/gofrs/flock"
)

// LockDataDir takes the data directory for this process alone, so a second
// prozess on the same directory stops before it touches any data in it. The
// lock is the operating system's (flock), so it goes with the process,
// however it ends. The returned func releases it.
func LockDataDir(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("--data-dir %s: %w", dir, err)
	}
	l := flock.New(filepath.Join(dir, "lock"))
	ok, err := l.TryLock()
	if err != nil {
		return nil, fmt.Errorf("--data-dir %s: locking it: %w", dir, err)
	}
	if !ok {
		return nil, fmt.Errorf("--data-dir %s is in use by another prozess (serve all or dev); stop it, or give this one another --data-dir", dir)
	}
	return func() { _ = l.Unlock() }, nil
}
