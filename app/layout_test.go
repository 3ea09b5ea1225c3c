package app_test

import (
	"go/build"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/prozess/prozess"

// participants are the saga's participants: each a package of its own that
// talks to the others only through the topic.
var participants = []string{"modules/api", "modules/inventory", "modules/payment", "modules/delivery", "modules/status"}

// layoutRule forbids the packages matching from from importing, directly or
// through any package of this module, the packages matching to.
type layoutRule struct {
	why      string
	from, to func(pkg string) bool
}

func under(prefix string) func(string) bool {
	return func(p string) bool { return p == prefix || strings.HasPrefix(p, prefix+"/") }
}
func is(pkgs ...string) func(string) bool {
	return func(p string) bool { return slices.Contains(pkgs, p) }
}

var layoutRules = []layoutRule{
	{"a participant never imports another participant", is(participants...), is(participants...)},
	{"modules/ never imports app/: wiring depends on participants, not the other way", under("modules"), under("app")},
	{"the saga runtime knows no participant and no wiring", under("app/saga"),
		func(p string) bool {
			return is(participants...)(p) || p == "app" || under("app/check")(p) || under("app/loadgen")(p)
		}},
	{"telemetry is a leaf: it observes, it is not built on anything of ours", under("app/telemetry"),
		func(p string) bool { return p != "" && !strings.HasPrefix(p, "app/telemetry") }},
	{"only main.go imports app", func(p string) bool { return p != "" && p != "app" }, is("app")},
}

// TestLayout enforces the import rules of docs/ARCHITECTURE.md over every
// package of the module, its tests' imports included.
func TestLayout(t *testing.T) {
	pkgs := readPackages(t, "..")
	if len(pkgs) < 10 {
		t.Fatalf("found only %d packages; is the module root ..?", len(pkgs))
	}
	violations := checkLayout(pkgs, layoutRules)
	for _, v := range violations {
		t.Error(v)
	}
}

// The rules catch what they are for: a forbidden import added to a copy of
// the real graph, directly or through another package, is reported.
func TestLayoutCatchesForbiddenImports(t *testing.T) {
	real := readPackages(t, "..")
	for _, c := range []struct{ from, to string }{
		{"modules/payment", "modules/inventory"},
		{"modules/status", "app/saga"},
		{"app/saga", "modules/delivery"},
		{"app/saga", "app"},
		{"app/telemetry", "modules/event"},
		{"modules/event", "app"}, // app/saga imports modules/event: app through event
		{"app/check", "app"},
	} {
		pkgs := map[string]pkgImports{}
		for k, v := range real {
			pkgs[k] = pkgImports{imports: slices.Clone(v.imports), tests: v.tests}
		}
		p := pkgs[c.from]
		p.imports = append(p.imports, c.to)
		pkgs[c.from] = p
		if len(checkLayout(pkgs, layoutRules)) == 0 {
			t.Errorf("an import of %s by %s went unnoticed", c.to, c.from)
		}
	}
}

type pkgImports struct {
	imports []string // this module's packages it imports, relative to the module
	tests   []string // what its tests import besides
}

// readPackages reads the imports of every package under root with go/build,
// keeping this module's packages only, relative to it ("" is main).
func readPackages(t *testing.T, root string) map[string]pkgImports {
	t.Helper()
	rel := func(ims []string) []string {
		var out []string
		for _, im := range ims {
			if im == module {
				out = append(out, "")
			} else if r, ok := strings.CutPrefix(im, module+"/"); ok {
				out = append(out, r)
			}
		}
		return out
	}
	pkgs := map[string]pkgImports{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "web") {
			return filepath.SkipDir
		}
		bp, err := build.Default.ImportDir(path, 0)
		if err != nil {
			if _, none := err.(*build.NoGoError); none {
				return nil
			}
			return err
		}
		dir, _ := filepath.Rel(root, path)
		dir = filepath.ToSlash(dir)
		if dir == "." {
			dir = ""
		}
		pkgs[dir] = pkgImports{imports: rel(bp.Imports), tests: rel(append(bp.TestImports, bp.XTestImports...))}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return pkgs
}

// checkLayout lists every rule a package breaks: through its imports'
// closure, or directly from its tests (a package's own tests may import
// it).
func checkLayout(pkgs map[string]pkgImports, rules []layoutRule) []string {
	var out []string
	for name, p := range pkgs {
		reached := closure(pkgs, p.imports)
		for _, im := range p.tests {
			if im != name {
				reached[im] = true
			}
		}
		for _, r := range rules {
			if !r.from(name) {
				continue
			}
			for im := range reached {
				if r.to(im) {
					out = append(out, "package "+show(name)+" reaches "+show(im)+": "+r.why)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

func closure(pkgs map[string]pkgImports, start []string) map[string]bool {
	seen := map[string]bool{}
	todo := slices.Clone(start)
	for len(todo) > 0 {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if seen[p] {
			continue
		}
		seen[p] = true
		todo = append(todo, pkgs[p].imports...)
	}
	return seen
}

func show(pkg string) string {
	if pkg == "" {
		return "main"
	}
	return pkg
}
