package kvmlab

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// The lab's environment: scripts/test.sh sets these for `go test
// ./internal/kvmlab` after the host's own tests.
const (
	// envFrom names the host's run record; TestLab runs what it defers.
	envFrom = "KVMSCOPE_LAB_FROM"
	// envOut is the directory for the lab's record, events and logs.
	envOut = "KVMSCOPE_LAB_OUT"
	// envCanary makes TestCanary fail ("fail") or panic ("panic").
	envCanary = "KVMSCOPE_LAB_CANARY"
	// envBenchTime is the -test.benchtime of deferred benchmarks
	// (scripts/bench.sh: 1x, as on the host).
	envBenchTime = "KVMSCOPE_LAB_BENCHTIME"
	// envICount runs L1 with -icount (Config.ICount).
	envICount = "KVMSCOPE_LAB_ICOUNT"
)

func repoRoot(t *testing.T) (repo, module string) {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	repo = filepath.Join(wd, "..", "..") // this is internal/kvmlab
	module, err = testenv.ModulePath(repo)
	if err != nil {
		t.Fatal(err)
	}
	return repo, module
}

func outDir(t *testing.T, repo, name string) string {
	d := os.Getenv(envOut)
	if d == "" {
		d = filepath.Join(repo, ".cache", "kvmlab")
	}
	d = filepath.Join(d, name)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// TestLab boots L1 once and runs in it every test the host's run record
// deferred to the lab; each comes back as a subtest with its output and
// verdict. The lab's own record and events are saved beside its logs for
// the run-record check (internal/testenv/runrecord).
func TestLab(t *testing.T) {
	from := os.Getenv(envFrom)
	if from == "" {
		t.Skip("the lab runs what a run record defers to it: set " + envFrom + "=RECORD (scripts/test.sh and `just lab` do)")
	}
	repo, module := repoRoot(t)
	entries, err := testenv.ReadRecord(from)
	if err != nil {
		t.Fatal(err)
	}
	jobs, err := Deferred(repo, module, entries)
	if err != nil {
		t.Fatal(err)
	}
	out := outDir(t, repo, "run")
	for _, f := range []string{"record.jsonl", "events.json", "output.txt"} {
		os.Remove(filepath.Join(out, f))
	}
	if len(jobs) == 0 {
		t.Log("no test was deferred to the lab: KVM runs here")
		return
	}
	// The benchmarks' knobs (KVMSCOPE_BENCH_REPS, ...) reach L1 too.
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "KVMSCOPE_BENCH_") {
			env = append(env, kv)
		}
	}
	for i := range jobs {
		jobs[i].Env = append(jobs[i].Env, env...)
		if jobs[i].Bench != "" {
			jobs[i].BenchTime = os.Getenv(envBenchTime)
			jobs[i].Timeout = 45 * time.Minute
		}
		t.Logf("job: %s -test.run %s -test.bench %s %v", jobs[i].Package, jobs[i].Run, jobs[i].Bench, jobs[i].Env)
	}
	cfg := Config{Repo: repo, Work: out, Jobs: jobs, Log: os.Stderr, ICount: os.Getenv(envICount)}
	for _, j := range jobs {
		if j.Bench != "" {
			cfg.Timeout = 85 * time.Minute // benchmarks repeat rounds (bench.sh allows 90)
		}
	}
	rep, err := Run(context.Background(), cfg)
	if rep != nil {
		save(t, out, rep)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("L1 ran %d jobs in %v", len(jobs), rep.Took.Round(time.Second))
	for _, v := range Verdicts(module, rep) {
		t.Run(v.Name, func(t *testing.T) {
			t.Log("output in the lab:\n" + v.Output)
			switch v.Action {
			case "pass":
			case "skip":
				t.Skip("skipped in the lab")
			case "":
				t.Error("did not finish in the lab")
			default:
				t.Error("failed in the lab")
			}
		})
	}
}

// save writes the lab's run record, its events (go test -json lines, with
// the packages' own import paths) and the test binaries' plain output (for
// scripts/bench.sh to read benchmark lines from) into dir.
func save(t *testing.T, dir string, rep *Report) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "record.jsonl"), rep.Record, 0o644); err != nil {
		t.Fatal(err)
	}
	var plain []byte
	for _, res := range rep.Results {
		plain = append(plain, bytes.ReplaceAll(res.Raw, []byte{0x16}, nil)...) // test2json's marker
	}
	if err := os.WriteFile(filepath.Join(dir, "output.txt"), plain, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(dir, "events.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	enc := json.NewEncoder(f)
	for _, res := range rep.Results {
		for _, e := range res.Events {
			if err := enc.Encode(e); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestCanary is the lab's own failing KVM test: inside L1, with
// KVMSCOPE_LAB_CANARY set, it uses KVM and then fails or panics on
// purpose, for TestLabPropagatesFailures.
func TestCanary(t *testing.T) {
	mode := os.Getenv(envCanary)
	if mode == "" {
		t.Skip("fails on purpose, only inside the lab for TestLabPropagatesFailures")
	}
	testenv.Require(t, testenv.KVM)
	switch mode {
	case "fail":
		t.Errorf("canary: KVM works here and this test fails on purpose")
	case "panic":
		panic("canary: panicking on purpose")
	}
}

// TestLabPropagatesFailures runs the canary in L1, failing and panicking:
// both must come back as failed verdicts with their messages.
func TestLabPropagatesFailures(t *testing.T) {
	testlinux.Require(t)
	t.Parallel()
	repo, module := repoRoot(t)
	pkg := module + "/internal/kvmlab"
	rep, err := Run(context.Background(), Config{
		Repo: repo, Work: outDir(t, repo, "canary"), Timeout: 10 * time.Minute,
		Jobs: []Job{
			{Package: pkg, Run: "^TestCanary$", Env: []string{envCanary + "=fail"}},
			{Package: pkg, Run: "^TestCanary$", Env: []string{envCanary + "=panic"}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Failed() {
		t.Error("a lab run whose tests failed is not Failed")
	}
	vs := Verdicts(module, rep)
	want := []struct{ name, says string }{
		{"internal/kvmlab.TestCanary", "canary: KVM works here and this test fails on purpose"},
		{"internal/kvmlab.TestCanary", "panic: canary: panicking on purpose"},
	}
	if len(vs) != len(want) {
		t.Fatalf("verdicts %+v, want %d", vs, len(want))
	}
	for i, v := range vs {
		if v.Name != want[i].name || v.Action != "fail" || !strings.Contains(v.Output, want[i].says) {
			t.Errorf("verdict %d: %s %q, output:\n%s\nwant %s failed, saying %q", i, v.Name, v.Action, v.Output, want[i].name, want[i].says)
		}
	}
	if rep.Results[1].ExitCode != 2 {
		t.Errorf("a panicking test binary exited %d in L1, want 2", rep.Results[1].ExitCode)
	}
	// Nothing of L1 is left running.
	if err := syscall.Kill(-rep.PID, 0); err != syscall.ESRCH {
		t.Errorf("L1's process group %d after the run: kill 0 = %v, want ESRCH", rep.PID, err)
	}
}

// TestLabNoKVM boots L1 on a CPU without SVM: kvm-amd cannot load, and the
// lab must say so in one line instead of running the tests.
func TestLabNoKVM(t *testing.T) {
	testlinux.Require(t)
	t.Parallel()
	repo, module := repoRoot(t)
	_, err := Run(context.Background(), Config{
		Repo: repo, Work: outDir(t, repo, "nokvm"), Timeout: 10 * time.Minute, CPU: "EPYC,-svm",
		Jobs: []Job{{Package: module + "/internal/kvmlab", Run: "^TestCanary$", Env: []string{envCanary + "=fail"}}},
	})
	if err == nil || !strings.HasPrefix(err.Error(), "kvmlab: L1 has no /dev/kvm: insmod kvm-amd.ko") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("lab on a CPU without SVM: %v; want one line starting \"kvmlab: L1 has no /dev/kvm: insmod kvm-amd.ko\"", err)
	}
	t.Log(err)
}

// TestLabNoBoot gives L1 a kernel that is no kernel: the lab must say in
// one line that L1 did not boot, naming the console log.
func TestLabNoBoot(t *testing.T) {
	testlinux.Require(t)
	t.Parallel()
	repo, module := repoRoot(t)
	bogus := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(bogus, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Run(context.Background(), Config{
		Repo: repo, Work: outDir(t, repo, "noboot"), Timeout: 5 * time.Minute, Kernel: bogus,
		Jobs: []Job{{Package: module + "/internal/kvmlab", Run: "^TestCanary$", Env: []string{envCanary + "=fail"}}},
	})
	if err == nil || !strings.HasPrefix(err.Error(), "kvmlab: L1 did not boot") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("lab with a bogus kernel: %v; want one line starting \"kvmlab: L1 did not boot\"", err)
	}
	t.Log(err)
}
