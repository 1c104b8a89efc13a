package kvmlab

import (
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/kvmscope/kvmscope/internal/testenv"
)

// Deferred turns the entries of a run record that the gate deferred to the
// lab into jobs: per package, one job for its deferred top-level tests, one
// per test whose gate deferred only some subtests (running just those: the
// others ran on the host already), and one for its benchmarks.
func Deferred(repo, module string, entries []testenv.Entry) ([]Job, error) {
	type pkgTests struct {
		whole map[string]bool            // top-level tests deferred whole
		subs  map[string]map[string]bool // top-level test -> deferred subtests
	}
	pkgs := map[string]*pkgTests{}
	for _, e := range entries {
		if e.Where != testenv.Deferred {
			continue
		}
		pkg, err := e.Package(repo, module)
		if err != nil {
			return nil, err
		}
		p := pkgs[pkg]
		if p == nil {
			p = &pkgTests{whole: map[string]bool{}, subs: map[string]map[string]bool{}}
			pkgs[pkg] = p
		}
		top, sub, _ := strings.Cut(e.Test, "/")
		if sub == "" {
			p.whole[top] = true
			continue
		}
		if p.subs[top] == nil {
			p.subs[top] = map[string]bool{}
		}
		// The first level is enough: deeper subtests run with theirs.
		p.subs[top][strings.SplitN(sub, "/", 2)[0]] = true
	}
	var jobs []Job
	for pkg, p := range pkgs {
		var ts, bs []string
		for n := range p.whole {
			if strings.HasPrefix(n, "Benchmark") {
				bs = append(bs, regexp.QuoteMeta(n))
			} else {
				ts = append(ts, regexp.QuoteMeta(n))
			}
		}
		if len(ts) > 0 {
			jobs = append(jobs, Job{Package: pkg, Run: alternatives(ts)})
		}
		if len(bs) > 0 {
			jobs = append(jobs, Job{Package: pkg, Run: "^$", Bench: alternatives(bs)})
		}
		for top, subs := range p.subs {
			if p.whole[top] {
				continue
			}
			var ss []string
			for s := range subs {
				ss = append(ss, regexp.QuoteMeta(s))
			}
			pat := alternatives([]string{regexp.QuoteMeta(top)}) + "/" + alternatives(ss)
			if strings.HasPrefix(top, "Benchmark") {
				jobs = append(jobs, Job{Package: pkg, Run: "^$", Bench: pat})
			} else {
				jobs = append(jobs, Job{Package: pkg, Run: pat})
			}
		}
	}
	sort.Slice(jobs, func(i, j int) bool {
		a, b := jobs[i], jobs[j]
		return a.Package+"\x00"+a.Run+"\x00"+a.Bench < b.Package+"\x00"+b.Run+"\x00"+b.Bench
	})
	return jobs, nil
}

// alternatives is a -test.run pattern matching exactly the names given
// (each already quoted).
func alternatives(names []string) string {
	sort.Strings(names)
	return "^(" + strings.Join(names, "|") + ")$"
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
			if v.Action == "" && strings.HasPrefix(top, "Benchmark") && res.ExitCode == 0 && pkgAction == "pass" {
				// test2json ends a benchmark with no action of its own
				// (only its result line): the binary's pass is its.
				v.Action = "pass"
			}
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
