// Package version names the build a prozess binary came from, so a bug
// report, a log line or a rollout can say which one it runs: the release
// version and commit stamped by the linker, or what the Go toolchain
// recorded (module version, VCS revision) when nothing was stamped.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version and Commit are set at link time, e.g.
//
//	go build -ldflags "-X github.com/prozess/prozess/app/version.Version=v1.2.0 -X github.com/prozess/prozess/app/version.Commit=$(git rev-parse HEAD)"
//
// They are variables only because -X can set nothing else; read them
// through Get.
var (
	Version string
	Commit  string
)

// Info is one build's identity.
type Info struct {
	Version   string // the release, "devel" when unknown
	Commit    string // the VCS revision, "unknown" when not recorded
	Modified  bool   // built from a work tree with uncommitted changes
	GoVersion string // the toolchain that built it
}

// Get returns the stamped version and commit, falling back on the build
// information the Go toolchain embeds (the main module's version when
// installed with go install, vcs.revision and vcs.modified when built in a
// git checkout).
func Get() Info {
	return resolve(Version, Commit, runtime.Version(), readBuildInfo)
}

func readBuildInfo() (*debug.BuildInfo, bool) { return debug.ReadBuildInfo() }

func resolve(version, commit, goVersion string, read func() (*debug.BuildInfo, bool)) Info {
	i := Info{Version: version, Commit: commit, GoVersion: goVersion}
	if bi, ok := read(); ok {
		if i.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			i.Version = bi.Main.Version
		}
		if i.Commit == "" {
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					i.Commit = s.Value
				case "vcs.modified":
					i.Modified = s.Value == "true"
				}
			}
		}
	}
	if i.Version == "" {
		i.Version = "devel"
	}
	if i.Commit == "" {
		i.Commit, i.Modified = "unknown", false
	}
	return i
}

// CommitLabel is the commit with "-dirty" when the work tree had
// uncommitted changes: what the version command and the build_info metric
// show.
func (i Info) CommitLabel() string {
	if i.Modified {
		return i.Commit + "-dirty"
	}
	return i.Commit
}

// String is the one-line form: "v1.2.0 (commit 1a2b3c, go1.26.8)".
func (i Info) String() string {
	return fmt.Sprintf("%s (commit %s, %s)", i.Version, i.CommitLabel(), i.GoVersion)
}
