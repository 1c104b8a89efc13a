package kvmlab

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/kvmscope/kvmscope/internal/testenv"
)

// Deferred turns the entries of a run record that the gate deferred to the
// lab into jobs: per package, one job for its tests and one for its
// benchmarks, each running the deferred top-level tests (a deferred subtest
// runs with its parent).
func Deferred(repo, module string, entries []testenv.Entry) ([]Job, error) {
	tests := map[string]map[string]bool{}
	for _, e := range entries {
		if e.Where != testenv.Deferred {
			continue
		}
		rel, err := filepath.Rel(repo, e.Dir)
		if err != nil || strings.HasPrefix(rel, "..") {
			return nil, fmt.Errorf("run record: test %s ran in %s, outside %s", e.Test, e.Dir, repo)
		}
		pkg := module
		if rel != "." {
			pkg += "/" + filepath.ToSlash(rel)
		}
		if tests[pkg] == nil {
			tests[pkg] = map[string]bool{}
		}
		tests[pkg][strings.SplitN(e.Test, "/", 2)[0]] = true
	}
	var jobs []Job
	for pkg, names := range tests {
		var ts, bs []string
		for n := range names {
			if strings.HasPrefix(n, "Benchmark") {
				bs = append(bs, regexp.QuoteMeta(n))
			} else {
				ts = append(ts, regexp.QuoteMeta(n))
			}
		}
		sort.Strings(ts)
		sort.Strings(bs)
		if len(ts) > 0 {
			jobs = append(jobs, Job{Package: pkg, Run: "^(" + strings.Join(ts, "|") + ")$"})
		}
		if len(bs) > 0 {
			jobs = append(jobs, Job{Package: pkg, Run: "^$", Bench: "^(" + strings.Join(bs, "|") + ")$"})
		}
	}
	sort.Slice(jobs, func(i, j int) bool {
		if jobs[i].Package != jobs[j].Package {
			return jobs[i].Package < jobs[j].Package
		}
		return jobs[i].Bench < jobs[j].Bench
	})
	return jobs, nil
}

// ModulePath reads the module path from repo/go.mod.
func ModulePath(repo string) (string, error) {
	b, err := os.ReadFile(filepath.Join(repo, "go.mod"))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("%s/go.mod: no module line", repo)
}

// A Verdict is one top-level test of a lab run, as the host reports it.
type Verdict struct {
	Name   string // package-relative: cmd/kvmscope.TestKVMCapture
	Action string // pass, fail, skip, or "" when the test never ended
	Output string
}

// Verdicts lists every top-level test of r with its outcome and its output.
// A binary that failed outside any test (TestMain, a panic in a goroutine,
// cut off by the end of L1) is a verdict of its own, named after the
// package, so no failure is lost.
func Verdicts(module string, r *Report) []Verdict {
	var out []Verdict
	for _, res := range r.Results {
		short := strings.TrimPrefix(strings.TrimPrefix(res.Job.Package, module), "/")
		if short == "" {
			short = "."
		}
		byTest := map[string]*Verdict{}
		var order []string
		var pkgOut strings.Builder
		pkgAction := ""
		anyFailed := false
		for _, e := range res.Events {
			if e.Test == "" {
				pkgOut.WriteString(e.Output)
				if e.Action == "pass" || e.Action == "fail" || e.Action == "skip" {
					pkgAction = e.Action
				}
				continue
			}
			top := strings.SplitN(e.Test, "/", 2)[0]
			v := byTest[top]
			if v == nil {
				v = &Verdict{Name: short + "." + top}
				byTest[top] = v
				order = append(order, top)
			}
			v.Output += e.Output
			if e.Test == top && (e.Action == "pass" || e.Action == "fail" || e.Action == "skip") {
				v.Action = e.Action
			}
		}
		for _, top := range order {
			v := byTest[top]
			if v.Action == "" {
				// It never ended: the binary panicked or timed out in
				// it, or L1 ended; the output says which.
				v.Action = "fail"
				v.Output += fmt.Sprintf("kvmlab: %s never ended (test binary exit status %d)\n", top, res.ExitCode)
			}
			if v.Action == "fail" {
				anyFailed = true
			}
			out = append(out, *v)
		}
		// A binary that failed outside every test (TestMain, or L1 ended
		// before it started one) is reported on its own.
		if (res.ExitCode != 0 || pkgAction == "fail") && !anyFailed {
			why := fmt.Sprintf("exit status %d", res.ExitCode)
			if res.ExitCode == -1 {
				why = "L1 ended before the test binary did"
			}
			out = append(out, Verdict{Name: short + " (" + why + ")", Action: "fail", Output: pkgOut.String()})
		}
	}
	return out
}
