package app_test

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/prozess/prozess/app/version"
)

// A binary stamped through -ldflags names its version and commit in
// `prozess version` and `prozess --version`.
func TestVersionNamesTheStampedCommit(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "prozess")
	const pkg = "github.com/prozess/prozess/app/version"
	const commit = "0123456789abcdef0123456789abcdef01234567"
	build := exec.Command("go", "build", "-o", bin,
		"-ldflags", "-X "+pkg+".Version=v9.8.7 -X "+pkg+".Commit="+commit, "..")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	want := "prozess v9.8.7\ncommit  " + commit + "\ngo      " + runtime.Version() + "\n"
	for _, args := range [][]string{{"version"}, {"--version"}} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("prozess %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		if string(out) != want {
			t.Errorf("prozess %s printed\n%s\nwant\n%s", strings.Join(args, " "), out, want)
		}
	}
}

// /metrics names the build that answers: prozess_build_info with its
// version, commit and Go version.
func TestBuildInfoOnMetrics(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.KafkaBrokers = e.broker()
	r := e.start(cfg, "payment")
	v := version.Get()
	want := fmt.Sprintf(`prozess_build_info{commit=%q,goversion=%q,version=%q} 1`, v.CommitLabel(), v.GoVersion, v.Version)
	m := scrape(t, "http://"+r.sys.AdminAddr()+"/metrics")
	if !slices.Contains(strings.Split(m, "\n"), want) {
		t.Errorf("/metrics has no line %s", want)
	}
}
