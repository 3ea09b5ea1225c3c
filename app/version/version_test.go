package version

import (
	"runtime/debug"
	"testing"
)

// Stamped values win; without them the toolchain's build information is
// used, and without that the build says plainly it does not know.
func TestResolve(t *testing.T) {
	vcs := func() (*debug.BuildInfo, bool) {
		return &debug.BuildInfo{Main: debug.Module{Version: "v0.3.0"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "abc123"}, {Key: "vcs.modified", Value: "true"}}}, true
	}
	devel := func() (*debug.BuildInfo, bool) {
		return &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, true
	}
	none := func() (*debug.BuildInfo, bool) { return nil, false }
	for _, c := range []struct {
		name            string
		version, commit string
		read            func() (*debug.BuildInfo, bool)
		want            string
	}{
		{"stamped", "v1.2.0", "f00d", vcs, "v1.2.0 (commit f00d, go1.x)"},
		{"from the toolchain", "", "", vcs, "v0.3.0 (commit abc123-dirty, go1.x)"},
		{"a go build in no checkout", "", "", devel, "devel (commit unknown, go1.x)"},
		{"no build information", "", "", none, "devel (commit unknown, go1.x)"},
	} {
		if got := resolve(c.version, c.commit, "go1.x", c.read).String(); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
