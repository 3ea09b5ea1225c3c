package app_test

import (
	"go/build"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/prozess/prozess"

// participants are the saga's participants: each a package of its own that
// talks to the others only through the topic.
var participants = []string{"modules/api", "modules/inventory", "modules/payment", "modules/delivery", "modules/status"}

// layoutRule forbids the packages matching from from reaching, directly or
// through any package of this module, the packages matching to. Their
// tests too, except for what testsMay lets them reach.
type layoutRule struct {
	why      string
	from, to func(pkg string) bool
	testsMay func(pkg string) bool
}

func under(prefix string) func(string) bool {
	return func(p string) bool { return p == prefix || strings.HasPrefix(p, prefix+"/") }
}
func is(pkgs ...string) func(string) bool {
	return func(p string) bool { return slices.Contains(pkgs, p) }
}

// layoutRules are the principles docs/ARCHITECTURE.md lists under the
// Packages table. The table says what each package may import; these say
// why, and catch a table edited to allow what they forbid.
var layoutRules = []layoutRule{
	{"a participant never imports another participant", is(participants...), is(participants...), nil},
	{"modules/ never imports app/: wiring depends on participants, not the other way (tests may reach the leaf app/embedded, through schema/schematest)",
		under("modules"), under("app"), is("app/embedded")},
	{"the saga runtime knows no participant and no wiring", under("app/saga"),
		func(p string) bool {
			return is(participants...)(p) || p == "app" || under("app/check")(p) || under("app/loadgen")(p)
		}, nil},
	{"telemetry is a leaf: it observes, it is not built on anything of ours", under("app/telemetry"),
		func(p string) bool { return p != "" && !strings.HasPrefix(p, "app/telemetry") }, nil},
	{"only main.go imports app", func(p string) bool { return p != "" && p != "app" }, is("app"), nil},
}

// architecture is where the allow-list lives: the Packages table.
const architecture = "../docs/ARCHITECTURE.md"

// TestLayout enforces docs/ARCHITECTURE.md over every package of the
// module: each package imports exactly what its row of the Packages table
// allows, its tests at most that and what the row's tests column adds, and
// nothing reached through them, the tests' imports followed transitively,
// breaks a rule of layoutRules.
func TestLayout(t *testing.T) {
	pkgs := readPackages(t, "..")
	if len(pkgs) < 10 {
		t.Fatalf("found only %d packages; is the module root ..?", len(pkgs))
	}
	table := readTable(t, architecture)
	for _, v := range checkAllowList(pkgs, table) {
		t.Error(v)
	}
	for _, v := range checkLayout(pkgs, layoutRules) {
		t.Error(v)
	}
}

// The checks catch what they are for, on copies of the real graph and the
// real table: an import the table does not allow (by a package or by its
// tests), a row that allows more than is imported, a package with no row;
// and, with the table edited to allow it, an import that breaks a rule,
// directly, through another package, or through what a test imports.
func TestLayoutCatchesForbiddenImports(t *testing.T) {
	realPkgs := readPackages(t, "..")
	realTable := readTable(t, architecture)
	copyAll := func() (map[string]pkgImports, map[string]allowList) {
		pkgs := map[string]pkgImports{}
		for k, v := range realPkgs {
			pkgs[k] = pkgImports{imports: slices.Clone(v.imports), tests: slices.Clone(v.tests)}
		}
		table := map[string]allowList{}
		for k, v := range realTable {
			table[k] = allowList{imports: slices.Clone(v.imports), tests: slices.Clone(v.tests), everything: v.everything}
		}
		return pkgs, table
	}
	if v := append(checkAllowList(realPkgs, realTable), checkLayout(realPkgs, layoutRules)...); len(v) > 0 {
		t.Fatalf("the real graph breaks the layout (TestLayout says how): %v", v)
	}
	for _, c := range []struct {
		from, to string
		test     bool // the import is by from's tests
		ruled    bool // the rules forbid it even when the table allows it
	}{
		{"modules/payment", "modules/inventory", false, true},
		{"modules/status", "app/saga", false, true},
		{"app/saga", "modules/delivery", false, true},
		{"app/saga", "app", false, true},
		{"app/telemetry", "modules/event", false, true},
		{"modules/event", "app", false, true}, // app/saga imports modules/event: app through event
		{"app/check", "app", false, true},
		{"modules/delivery", "modules/retry", false, false}, // allowed by no rule's principle, by no row either
		{"modules/payment", "modules/delivery", true, true},
		{"modules/inventory", "app/saga/sagatest", true, true},
		// modules' tests import schema/schematest: app/saga through it.
		{"schema/schematest", "app/saga", false, true},
	} {
		pkgs, table := copyAll()
		p := pkgs[c.from]
		a := table[c.from]
		if c.test {
			p.tests = append(p.tests, c.to)
			a.tests = append(a.tests, c.to)
		} else {
			p.imports = append(p.imports, c.to)
			a.imports = append(a.imports, c.to)
		}
		pkgs[c.from] = p
		if len(checkAllowList(pkgs, realTable)) == 0 {
			t.Errorf("an import of %s by %s (tests %v) went unnoticed by the allow-list", c.to, c.from, c.test)
		}
		table[c.from] = a
		if v := checkAllowList(pkgs, table); len(v) > 0 {
			t.Errorf("with the row of %s allowing %s: %v", c.from, c.to, v)
		}
		if got := len(checkLayout(pkgs, layoutRules)) > 0; got != c.ruled {
			t.Errorf("an import of %s by %s (tests %v): rules report it %v, want %v", c.to, c.from, c.test, got, c.ruled)
		}
	}

	// A row allowing what the package does not import, for it or its tests.
	pkgs, table := copyAll()
	a := table["modules/event"]
	a.imports = append(a.imports, "modules/retry")
	table["modules/event"] = a
	if len(checkAllowList(pkgs, table)) == 0 {
		t.Error("a row allowing an import that is not there went unnoticed")
	}
	pkgs, table = copyAll()
	a = table["modules/delivery"]
	a.tests = append(a.tests, "modules/retry")
	table["modules/delivery"] = a
	if len(checkAllowList(pkgs, table)) == 0 {
		t.Error("a row allowing tests an import they do not make went unnoticed")
	}
	// A package the table does not name, and a row naming no package.
	pkgs, table = copyAll()
	pkgs["modules/newthing"] = pkgImports{imports: []string{"modules/event"}}
	if len(checkAllowList(pkgs, table)) == 0 {
		t.Error("a package with no row went unnoticed")
	}
	pkgs, table = copyAll()
	delete(pkgs, "modules/retry")
	for k, v := range pkgs {
		v.imports = slices.DeleteFunc(v.imports, is("modules/retry"))
		pkgs[k] = v
	}
	if len(checkAllowList(pkgs, table)) == 0 {
		t.Error("a row naming no package went unnoticed")
	}
}

type pkgImports struct {
	imports []string // this module's packages it imports, relative to the module
	tests   []string // what its tests import, itself included for an external test package
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
		slices.Sort(out)
		return slices.Compact(out)
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

// allowList is one row of the Packages table.
type allowList struct {
	imports    []string // "may import (of ours)"
	everything bool     // "everything below": any package of a later row
	tests      []string // "its tests may also import"
}

var backticked = regexp.MustCompile("`([^`]+)`")

// readTable parses docs/ARCHITECTURE.md's Packages table: | `package` |
// purpose | may import (of ours) | its tests may also import |. A cell
// lists packages in backticks, or says "nothing of ours" (or is empty);
// app's says "everything below".
func readTable(t *testing.T, path string) map[string]allowList {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "\n## Packages\n")
	if !ok {
		t.Fatalf("%s has no Packages section", path)
	}
	var (
		rows  []string
		table = map[string]allowList{}
		names = func(cell string) []string {
			var out []string
			for _, m := range backticked.FindAllStringSubmatch(cell, -1) {
				out = append(out, pkgName(m[1]))
			}
			return out
		}
		seenHeader bool
	)
	for _, line := range strings.Split(rest, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "|") {
			if seenHeader {
				break
			}
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if !seenHeader {
			want := []string{"package", "one purpose", "may import (of ours)", "its tests may also import"}
			for i := range cells {
				cells[i] = strings.TrimSpace(cells[i])
			}
			if !slices.Equal(cells, want) {
				t.Fatalf("%s: the Packages table's header is %q, want %q", path, cells, want)
			}
			seenHeader = true
			continue
		}
		if strings.HasPrefix(line, "|---") {
			continue
		}
		if len(cells) != 4 {
			t.Fatalf("%s: a row of the Packages table has %d cells, want 4: %s", path, len(cells), line)
		}
		pkg := names(cells[0])
		if len(pkg) != 1 {
			t.Fatalf("%s: a row names %d packages in its first cell: %s", path, len(pkg), line)
		}
		a := allowList{imports: names(cells[2]), tests: names(cells[3])}
		switch may := strings.TrimSpace(cells[2]); {
		case may == "everything below":
			a.everything = true
		case len(a.imports) == 0 && may != "" && !strings.HasPrefix(may, "nothing of ours"):
			t.Fatalf("%s: the row of %s allows %q: name packages in backticks, or say nothing of ours", path, show(pkg[0]), may)
		}
		if _, dup := table[pkg[0]]; dup {
			t.Fatalf("%s: two rows for %s", path, show(pkg[0]))
		}
		table[pkg[0]] = a
		rows = append(rows, pkg[0])
	}
	for i, p := range rows {
		if a := table[p]; a.everything {
			a.imports = slices.Clone(rows[i+1:])
			table[p] = a
		}
	}
	if len(table) == 0 {
		t.Fatalf("%s: no rows in the Packages table", path)
	}
	return table
}

// pkgName is a table's name for a package as readPackages names it:
// `main.go` is "", `app/` is "app".
func pkgName(s string) string {
	if s == "main.go" {
		return ""
	}
	return strings.TrimSuffix(s, "/")
}

// checkAllowList lists where the packages and the table disagree: a
// package with no row or a row with no package, an import its row does not
// allow, an import its row allows that is not made (the table says exactly
// what is imported; a row of "everything below" says only what may be), a
// test import neither the row's imports nor its tests column allow, and a
// tests column entry no test imports.
func checkAllowList(pkgs map[string]pkgImports, table map[string]allowList) []string {
	var out []string
	for name, p := range pkgs {
		a, ok := table[name]
		if !ok {
			out = append(out, "package "+show(name)+" has no row in the Packages table")
			continue
		}
		for _, im := range p.imports {
			if !slices.Contains(a.imports, im) {
				out = append(out, "package "+show(name)+" imports "+show(im)+", which its row does not allow")
			}
		}
		if !a.everything {
			for _, im := range a.imports {
				if !slices.Contains(p.imports, im) {
					out = append(out, "the row of "+show(name)+" allows "+show(im)+", which it does not import")
				}
			}
		}
		for _, im := range p.tests {
			if im != name && !slices.Contains(a.imports, im) && !slices.Contains(a.tests, im) {
				out = append(out, "the tests of "+show(name)+" import "+show(im)+", which its row does not allow")
			}
		}
		for _, im := range a.tests {
			if !slices.Contains(p.tests, im) {
				out = append(out, "the row of "+show(name)+" lets its tests import "+show(im)+", which they do not")
			}
		}
	}
	for name := range table {
		if _, ok := pkgs[name]; !ok {
			out = append(out, "the Packages table has a row for "+show(name)+", which is no package")
		}
	}
	slices.Sort(out)
	return out
}

// checkLayout lists every rule a package breaks through its imports'
// closure, or its tests break through theirs (a package's own tests may
// import it).
func checkLayout(pkgs map[string]pkgImports, rules []layoutRule) []string {
	var out []string
	for name, p := range pkgs {
		reached := closure(pkgs, p.imports)
		byTests := closure(pkgs, p.tests)
		for _, r := range rules {
			if !r.from(name) {
				continue
			}
			for im := range reached {
				if r.to(im) {
					out = append(out, "package "+show(name)+" reaches "+show(im)+": "+r.why)
				}
			}
			for im := range byTests {
				if im != name && !reached[im] && r.to(im) && (r.testsMay == nil || !r.testsMay(im)) {
					out = append(out, "the tests of "+show(name)+" reach "+show(im)+": "+r.why)
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
