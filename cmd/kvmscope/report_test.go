package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/session"
)

// docsRules is the docs' first example (docRules) and a hidden-process
// rule.
const docsRules = docRules + `  - name: hidden process
    severity: critical
    hidden: {processes: true}
  - name: hidden module
    severity: critical
    hidden: {modules: true}
`

// replaceFile writes text to path the way editors do: a new file renamed
// over the old one.
func replaceFile(t *testing.T, path, text string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func reportJSON(t *testing.T, args ...string) session.Report {
	t.Helper()
	out, errOut, code := kvmscope(t, append([]string{"report", "--json"}, args...)...)
	var r session.Report
	if code != 0 || json.Unmarshal([]byte(out), &r) != nil {
		t.Fatalf("report %v: code %d: %s%s", args, code, out, errOut)
	}
	return r
}

func findingOf(r session.Report, rule string) *session.Report {
	for _, f := range r.Findings {
		if f.Rule == rule && f.Active {
			one := r
			one.Findings = append(one.Findings[:0:0], f)
			return &one
		}
	}
	return nil
}

// TestRules: a Debian guest under TCG judged by `run --rules FILE
// --scan-interval 1s`. A process named in a deny rule, started late by
// the guest (kvmscope.late=3), becomes a finding event within a few scans
// and a report entry with first and last seen; the next scans use an
// edited file; a broken edit keeps the rules in force and names its line;
// a process unlinked from the tasks list from the host (--allow-write) is
// reported hidden, with the views that still see it.
func TestRules(t *testing.T) {
	p := testlinux.Require(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	rulesPath := filepath.Join(dir, "rules.yaml")
	replaceFile(t, rulesPath, docsRules)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel: p.DebianKernel,
		Accel:  "tcg",
		Initrd: modulesInitrd(t, p),
		Append: "kvmscope.late=3 kvmscope.modules=1",
		Wrapper: []string{kvmscopeBin, "--log-level", "info", "run", "--api", sock, "--allow-write",
			"--rules", rulesPath, "--scan-interval", "1s", "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run --rules: %v", err)
	}
	defer g.Close()

	// The miner: an event, then a report entry that persists.
	var ev map[string]any
	waitFor(t, 60*time.Second, "a finding event for crypto-miner", func() bool {
		for _, e := range events(t, sock) {
			if e["kind"] == "finding" && e["rule"] == "no miners" {
				ev = e
				return true
			}
		}
		time.Sleep(200 * time.Millisecond)
		return false
	})
	evid, _ := ev["evidence"].(map[string]any)
	if ev["severity"] != "high" || ev["finding"] != "process" || evid["comm"] != "crypto-miner" || evid["pid"] == nil || evid["task"] == nil {
		t.Errorf("finding event: %v", ev)
	}
	r1 := findingOf(reportJSON(t, "--api", sock), "no miners")
	time.Sleep(2500 * time.Millisecond)
	r2 := findingOf(reportJSON(t, "--api", sock, "--cached"), "no miners")
	if r1 == nil || r2 == nil {
		t.Fatalf("report lacks the active miner finding: %+v, %+v", r1, r2)
	}
	f1, f2 := r1.Findings[0], r2.Findings[0]
	if !f1.FirstSeen.Equal(f2.FirstSeen) || !f2.LastSeen.After(f1.LastSeen) || f2.Count <= f1.Count {
		t.Errorf("a finding that persists: first %v/%v, last %v/%v, count %d/%d", f1.FirstSeen, f2.FirstSeen, f1.LastSeen, f2.LastSeen, f1.Count, f2.Count)
	}
	if r2.Rules != rulesPath || r2.Partial {
		t.Errorf("report: rules %q, partial %v (%v)", r2.Rules, r2.Partial, r2.Warnings)
	}
	out, errOut, code := kvmscope(t, "report", "--api", sock)
	if code != 0 || !strings.Contains(out, "no miners") || !strings.Contains(out, "high") {
		t.Errorf("report: code %d: %s%s", code, out, errOut)
	}
	n := 0
	for _, e := range events(t, sock) {
		if e["kind"] == "finding" && e["rule"] == "no miners" {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d finding events for one persisting miner, want 1", n)
	}

	// An edit: the next scans judge by the new file.
	replaceFile(t, rulesPath, docsRules+"  - name: no sleepers\n    severity: low\n    process: {name: sleep}\n")
	waitFor(t, 30*time.Second, "the edited rules to find the sleep processes", func() bool {
		time.Sleep(300 * time.Millisecond)
		return findingOf(reportJSON(t, "--api", sock, "--cached"), "no sleepers") != nil
	})

	// A broken edit: the rules in force (5) stay, the error names line 3.
	replaceFile(t, rulesPath, "rules:\n  - name: broken\n    severity: urgent\n    process: {name: a}\n")
	var rulesErr string
	waitFor(t, 30*time.Second, "a rules_error event", func() bool {
		for _, e := range events(t, sock) {
			if e["kind"] == "rules_error" {
				rulesErr, _ = e["error"].(string)
				return true
			}
		}
		time.Sleep(200 * time.Millisecond)
		return false
	})
	if !strings.HasPrefix(rulesErr, rulesPath+":3:") || strings.Contains(rulesErr, "\n") {
		t.Errorf("rules error %q: want one line starting %s:3:", rulesErr, rulesPath)
	}
	var info api.RulesInfo
	if err := api.NewClient(sock).Get(ctxT(t), "/v1/rules", &info); err != nil || len(info.Rules) != 5 || info.Rules[4].Name != "no sleepers" {
		t.Errorf("rules in force after a broken edit: %+v (%v)", info, err)
	}
	if out, errOut, code := kvmscope(t, "rules", "reload", "--api", sock); code != 1 || !strings.Contains(errOut, rulesPath+":3:") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("rules reload of a broken file: code %d: %s%s", code, out, errOut)
	}
	replaceFile(t, rulesPath, docsRules)
	waitFor(t, 30*time.Second, "the good rules back", func() bool {
		time.Sleep(200 * time.Millisecond)
		var info api.RulesInfo
		return api.NewClient(sock).Get(ctxT(t), "/v1/rules", &info) == nil && len(info.Rules) == 4
	})

	// SIGHUP to the tracer reloads the file, and QEMU does not see it.
	tracerPID := tracerOf(t, g.Pid())
	if err := syscall.Kill(tracerPID, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "a reload on SIGHUP", func() bool {
		for _, e := range events(t, sock) {
			if e["kind"] == "rules_reloaded" && e["why"] == "SIGHUP" {
				return true
			}
		}
		time.Sleep(100 * time.Millisecond)
		return false
	})
	if syscall.Kill(g.Pid(), 0) != nil || len(psJSON(t, "--api", sock)) == 0 {
		t.Fatal("QEMU did not survive a SIGHUP to its tracer")
	}

	// DKOM: unlink one sleep process from the tasks list; the PID
	// allocator still holds it.
	victim, restore := unlinkTask(t, sock, "sleep")
	defer restore()
	if slices.ContainsFunc(psJSON(t, "--api", sock), func(p api.Process) bool { return p.PID == victim }) {
		t.Fatalf("pid %d still listed by ps after the unlink", victim)
	}
	rep := reportJSON(t, "--api", sock)
	var hidden *session.Report
	for _, f := range rep.Findings {
		if f.Kind == "hidden_process" && f.Evidence.PID == victim && f.Active {
			hidden = &session.Report{Findings: append(rep.Findings[:0:0], f)}
		}
	}
	if hidden == nil {
		t.Fatalf("report does not name pid %d as hidden: %+v", victim, rep)
	}
	if h := hidden.Findings[0]; !slices.Contains(h.Evidence.SeenBy, "pid_idr") || !slices.Contains(h.Evidence.MissingFrom, "tasks") || h.Severity.String() != "critical" {
		t.Errorf("hidden finding: %+v", h)
	}
	t.Logf("hidden: %s; views %+v", hidden.Findings[0].Summary, rep.Views)

	// DKOM on the modules list: one module unlinked from it; module_kset
	// (and the carve) still see it.
	mod, restoreMod := unlinkModule(t, sock, "dummy")
	defer restoreMod()
	rep = reportJSON(t, "--api", sock)
	foundMod := false
	for _, f := range rep.Findings {
		if f.Kind == "hidden_module" && f.Evidence.Module == mod && f.Active {
			foundMod = true
			if len(f.Evidence.SeenBy) == 0 || !slices.Contains(f.Evidence.MissingFrom, "modules") {
				t.Errorf("hidden module finding: %+v", f)
			}
		}
	}
	if !foundMod {
		t.Errorf("report does not name module %s as hidden: %+v", mod, rep.Findings)
	}

	// The same judgement on a dump of the guest, by the same rules.
	core := filepath.Join(dir, "vm.core")
	if _, errOut, code := kvmscope(t, "dump", "--api", sock, "-o", core); code != 0 {
		t.Fatalf("dump: %s", errOut)
	}
	restore()
	restoreMod()
	rep = reportJSON(t, "--core", core, "--rules", rulesPath)
	found := false
	for _, f := range rep.Findings {
		found = found || (f.Kind == "hidden_process" && f.Evidence.PID == victim)
	}
	if !found || findingOf(rep, "no miners") == nil {
		t.Errorf("report of the dump: %+v", rep)
	}
}

// unlinkTask takes the first process named comm off the guest's tasks
// list by pointing its neighbours at each other (PUT /v1/memory?va=; the
// VM runs with --allow-write), as a rootkit hides a process. It returns the
// pid and a function that links the task back in.
func unlinkTask(t *testing.T, sock, comm string) (int, func()) {
	t.Helper()
	tasksOff := kernelOffset(t, sock, "task_struct.tasks")
	read, write := kernelWord(t, sock)
	for _, p := range psJSON(t, "--api", sock) {
		if p.Comm != comm {
			continue
		}
		node := uint64(p.Task) + uint64(tasksOff)
		next, prev := read(node), read(node+8)
		write(prev, next)   // prev->next = next
		write(next+8, prev) // next->prev = prev
		return p.PID, func() {
			write(prev, node)
			write(next+8, node)
		}
	}
	t.Fatalf("no %s process", comm)
	return 0, nil
}

// tracerOf is the pid tracing pid (its TracerPid): kvmscope's tracer.
func tracerOf(t *testing.T, pid int) int {
	t.Helper()
	n := tracerPid(t, pid)
	if n == 0 {
		t.Fatalf("process %d is not traced", pid)
	}
	return n
}

// tracerPid is pid's TracerPid (0: not traced).
func tracerPid(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "TracerPid:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatalf("TracerPid of %d: %q", pid, v)
			}
			return n
		}
	}
	t.Fatalf("no TracerPid in /proc/%d/status", pid)
	return 0
}

// modulesInitrd is the test initramfs with Debian 6.1's test modules
// appended under /modules, which /init loads with kvmscope.modules=1 (the
// kernel unpacks concatenated archives in order).
func modulesInitrd(t *testing.T, p testlinux.Paths) string {
	t.Helper()
	dir := t.TempDir()
	kos, _ := filepath.Glob(filepath.Join(p.Dir, "debian", "modules", "*.ko"))
	if len(kos) == 0 {
		t.Fatalf("no test modules in %s/debian/modules (just guests)", p.Dir)
	}
	if err := os.MkdirAll(filepath.Join(dir, "tree", "modules"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, ko := range kos {
		b, err := os.ReadFile(ko)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "tree", "modules", filepath.Base(ko)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("sh", "-c", "find modules | cpio -o -H newc --quiet | gzip -n")
	cmd.Dir = filepath.Join(dir, "tree")
	extra, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio of the modules: %v", err)
	}
	base, err := os.ReadFile(p.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "initrd.gz")
	if err := os.WriteFile(out, append(base, extra...), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// unlinkModule takes the module called name off the guest's modules list
// by pointing its neighbours at each other through kernel virtual
// addresses (PUT /v1/memory?va=; the VM runs with --allow-write), as a
// rootkit hides itself. It returns the name and a function that links it
// back in.
func unlinkModule(t *testing.T, sock, name string) (string, func()) {
	t.Helper()
	listOff := kernelOffset(t, sock, "module.list")
	c := api.NewClient(sock)
	read, write := kernelWord(t, sock)
	var ms []api.Module
	if err := c.Get(ctxT(t), "/v1/modules", &ms); err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Name != name {
			continue
		}
		node := uint64(m.Addr) + uint64(listOff)
		next, prev := read(node), read(node+8)
		write(prev, next)
		write(next+8, prev)
		done := false
		return name, func() {
			if !done {
				done = true
				write(prev, node)
				write(next+8, node)
			}
		}
	}
	t.Fatalf("no module %s loaded: %+v", name, ms)
	return "", nil
}

// kernelWord reads and writes 8-byte words of the guest at kernel virtual
// addresses, through the API (GET and PUT /v1/memory?va=).
func kernelWord(t *testing.T, sock string) (read func(va uint64) uint64, write func(va, v uint64)) {
	c := api.NewClient(sock)
	read = func(va uint64) uint64 {
		b, err := c.GetRaw(ctxT(t), fmt.Sprintf("/v1/memory?va=%#x&len=8", va))
		if err != nil || len(b) != 8 {
			t.Fatalf("read %#x: %v", va, err)
		}
		return binary.LittleEndian.Uint64(b)
	}
	write = func(va, v uint64) {
		if err := c.Put(ctxT(t), fmt.Sprintf("/v1/memory?va=%#x", va), binary.LittleEndian.AppendUint64(nil, v)); err != nil {
			t.Fatalf("write %#x: %v", va, err)
		}
	}
	return read, write
}

// kernelOffset is the struct member offset the VM's kernel discovery
// found (GET /v1/kernel), such as "task_struct.tasks".
func kernelOffset(t *testing.T, sock, name string) int64 {
	t.Helper()
	var k api.Kernel
	out, _, _ := kvmscope(t, "kernel", "--api", sock, "--json")
	if err := json.Unmarshal([]byte(out), &k); err != nil {
		t.Fatal(err)
	}
	for _, m := range k.Offsets {
		if m.Name == name && m.Source != "" {
			return m.Value
		}
	}
	t.Fatalf("%s unknown: %+v", name, k.Offsets)
	return 0
}
