// Command runrecord checks a `just test` run: it joins the gate's run
// records (internal/testenv) of the host and of the nested-KVM lab with
// the go test events of both, prints every failure with its output, every
// skip with its reason and where each gated test ran, writes the joined
// record as JSON, and fails when a test failed or, with -require, when a
// test that must run ran nowhere. scripts/test.sh runs it.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/kvmscope/kvmscope/internal/testenv"
)

// event is a go test -json event.
type event struct {
	Action, Package, Test, Output string
}

// Row is one gated test in the joined record.
type Row struct {
	Package string         `json:"package"`
	Test    string         `json:"test"`
	Needs   []testenv.Need `json:"needs"`
	// Where is native, lab, not-run or skipped; "nowhere" when the host
	// deferred it to a lab that did not run it.
	Where   string `json:"where"`
	Verdict string `json:"verdict"` // pass, fail, skip or "" (never ended)
	Reason  string `json:"reason,omitempty"`
}

func main() {
	hostEvents := flag.String("host-events", ".cache/test.json", "go test -json output of the host's tests")
	hostRecord := flag.String("host-record", ".cache/record.jsonl", "the host's run record")
	labEvents := flag.String("lab-events", ".cache/kvmlab/run/events.json", "the lab's test events")
	labRecord := flag.String("lab-record", ".cache/kvmlab/run/record.jsonl", "the lab's run record")
	labStep := flag.String("lab-step", ".cache/lab-test.json", "go test -json output of the lab step (./internal/kvmlab)")
	out := flag.String("o", ".cache/run-record.json", "write the joined record here")
	require := flag.Bool("require", false, "fail when a gated test ran nowhere (CI)")
	flag.Parse()
	if err := run(*hostEvents, *hostRecord, *labEvents, *labRecord, *labStep, *out, *require, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "runrecord:", err)
		os.Exit(1)
	}
}

func run(hostEvents, hostRecord, labEvents, labRecord, labStep, out string, require bool, w io.Writer) error {
	repo, err := os.Getwd()
	if err != nil {
		return err
	}
	module, err := testenv.ModulePath(repo)
	if err != nil {
		return err
	}
	var evs []event
	for _, f := range []string{hostEvents, labStep, labEvents} {
		e, err := testenv.ReadJSONLines[event](f)
		if err != nil {
			return err
		}
		evs = append(evs, e...)
	}
	verdict := map[string]string{}
	output := map[string]*strings.Builder{}
	tests := map[string]int{}
	for _, e := range evs {
		if e.Test != "" && (e.Action == "pass" || e.Action == "fail" || e.Action == "skip") {
			tests[e.Action]++
		}
		if e.Test == "" && (e.Action == "pass" || e.Action == "fail" || e.Action == "skip") {
			fmt.Fprintf(w, "%-4s %s\n", map[string]string{"pass": "ok", "fail": "FAIL", "skip": "?"}[e.Action], e.Package)
		}
		k := e.Package + "\x00" + e.Test
		if output[k] == nil {
			output[k] = &strings.Builder{}
		}
		output[k].WriteString(e.Output)
		switch e.Action {
		case "pass", "fail", "skip":
			verdict[k] = e.Action
		}
	}
	host, err := testenv.ReadRecord(hostRecord)
	if err != nil {
		return err
	}
	lab, err := testenv.ReadRecord(labRecord)
	if err != nil {
		return err
	}
	// A record names a test by its directory; events by its package.
	pkgOf := func(e testenv.Entry) string {
		p, err := e.Package(repo, module)
		if err != nil {
			return e.Dir
		}
		return p
	}
	key := func(e testenv.Entry) string { return pkgOf(e) + "\x00" + e.Test }
	inLab := map[string]testenv.Entry{}
	for _, e := range lab {
		inLab[key(e)] = e
	}
	rows := map[string]*Row{}
	for _, e := range host {
		r := &Row{Package: pkgOf(e), Test: e.Test, Needs: e.Needs, Where: e.Where, Reason: e.Reason}
		if e.Where == testenv.Deferred {
			if l, ok := inLab[key(e)]; ok {
				r.Where, r.Reason = l.Where, l.Reason
			} else {
				r.Where, r.Reason = "nowhere", "deferred to the lab, which did not run it: "+e.Reason
			}
		}
		r.Verdict = verdict[key(e)]
		// A test may pass the gate more than once (a helper's own
		// Require): its needs are all of them, and a decision not to run
		// stands.
		if prev := rows[key(e)]; prev != nil {
			r.Needs = union(prev.Needs, r.Needs)
			if prev.Where != testenv.Native && prev.Where != testenv.Lab {
				r.Where, r.Reason = prev.Where, prev.Reason
			}
		}
		rows[key(e)] = r
	}
	// Tests only the lab saw (their gate is in a subtest the host never
	// reached, say) count too.
	for k, e := range inLab {
		if rows[k] == nil {
			rows[k] = &Row{Package: pkgOf(e), Test: e.Test, Needs: e.Needs, Where: e.Where, Reason: e.Reason, Verdict: verdict[k]}
		}
	}
	var list []Row
	for _, r := range rows {
		list = append(list, *r)
	}
	sort.Slice(list, func(i, j int) bool {
		if list[i].Package != list[j].Package {
			return list[i].Package < list[j].Package
		}
		return list[i].Test < list[j].Test
	})
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return err
	}

	// Failures first, with their output.
	var failed []string
	for k, v := range verdict {
		if v == "fail" {
			failed = append(failed, k)
		}
	}
	sort.Strings(failed)
	if len(failed) > 0 {
		fmt.Fprintln(w, "== failures ==")
		for _, k := range failed {
			pkg, test, _ := strings.Cut(k, "\x00")
			fmt.Fprintf(w, "--- FAIL %s %s\n%s\n", pkg, test, tail(output[k].String(), 6000))
		}
	}
	// Skips outside the gate, with their reasons.
	var skips []string
	for k, v := range verdict {
		pkg, test, _ := strings.Cut(k, "\x00")
		if v == "skip" && test != "" && rows[k] == nil && !strings.HasPrefix(pkg, module+"/internal/kvmlab") {
			skips = append(skips, fmt.Sprintf("%s %s: %s", pkg, test, skipReason(output[k].String())))
		}
	}
	sort.Strings(skips)
	if len(skips) > 0 {
		fmt.Fprintln(w, "== skipped (not gated) ==")
		for _, s := range skips {
			fmt.Fprintln(w, s)
		}
	}

	fmt.Fprintf(w, "== where each gated test ran (%s) ==\n", out)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	count := map[string]int{}
	var nowhere []string
	for _, r := range list {
		count[r.Where]++
		needs := make([]string, len(r.Needs))
		for i, n := range r.Needs {
			needs[i] = string(n)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", strings.TrimPrefix(r.Package, module+"/"), r.Test, strings.Join(needs, ","), r.Where, orDash(r.Verdict), r.Reason)
		if r.Where == testenv.Skipped || r.Where == "nowhere" {
			nowhere = append(nowhere, r.Package+" "+r.Test+": "+r.Reason)
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "tests: %d passed, %d failed, %d skipped\n", tests["pass"], tests["fail"], tests["skip"])
	fmt.Fprintf(w, "gated tests: %d native, %d lab, %d not run (declared), %d skipped, %d nowhere\n",
		count[testenv.Native], count[testenv.Lab], count[testenv.NotRun], count[testenv.Skipped], count["nowhere"])
	var errs []error
	if len(failed) > 0 {
		errs = append(errs, fmt.Errorf("%d failed", len(failed)))
	}
	if require && len(nowhere) > 0 {
		errs = append(errs, fmt.Errorf("%d tests that must run ran nowhere:\n  %s", len(nowhere), strings.Join(nowhere, "\n  ")))
	}
	return errors.Join(errs...)
}

// skipReason is the line before "--- SKIP" in a skipped test's output.
func skipReason(out string) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for i, l := range lines {
		if strings.Contains(l, "--- SKIP") && i > 0 {
			return strings.TrimSpace(lines[i-1])
		}
	}
	return strings.TrimSpace(lines[len(lines)-1])
}

func union(a, b []testenv.Need) []testenv.Need {
	out := append([]testenv.Need(nil), a...)
	for _, n := range b {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
